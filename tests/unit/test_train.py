"""Training and evaluation on the phantom: patient-disjoint splits, resumable runs, a usable artifact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from daemon.cli import app
from model.artifact import load_artifact
from model.network import Architecture, DenseNet
from model.train import TrainConfig, render_split, split_of, train
from model.types import PreprocessRecipe

RECIPE = PreprocessRecipe(input_size=64, resize=None)


def test_splits_are_patient_disjoint_and_near_70_15_15() -> None:
    parts = {name: render_split(name, seed=0, count=40, recipe=RECIPE, render_size=64) for name in ("train", "test")}
    assert not set(parts["train"].patients) & set(parts["test"].patients)
    shares = [split_of(f"P{i}") for i in range(2000)]
    assert abs(shares.count("train") / 2000 - 0.70) < 0.04 and abs(shares.count("test") / 2000 - 0.15) < 0.03


def test_training_resumes_from_its_saved_state(tmp_path: Path) -> None:
    config = TrainConfig(train_images=24, val_images=12, epochs=2, batch_size=8, render_size=64, device="cpu")
    state = tmp_path / "state.pt"
    torch.manual_seed(0)
    _, first = train(DenseNet(Architecture.tiny()), config, recipe=RECIPE, state_path=state)
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2
    same = TrainConfig(**config.to_dict())
    model, again = train(DenseNet(Architecture.tiny()), same, recipe=RECIPE, state_path=state)
    assert again["history"] == [], "a finished run resumes with nothing left to do"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][key])


def test_train_cli_writes_a_synthetic_artifact_that_evaluate_reads(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(app, ["train", "--arch", "tiny", "--size", "64", "--train-images", "24",
                                 "--val-images", "12", "--test-images", "20", "--epochs", "1", "--batch-size", "8",
                                 "--device", "cpu", "--dtype", "float32", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    _, manifest = load_artifact(out)
    assert manifest.synthetic and "not for diagnosis" in manifest.intended_use
    assert manifest.metrics["test"]["mean_auroc"] is not None
    evaluated = runner.invoke(app, ["evaluate", "--model", str(out), "--phantom", "test", "--count", "20",
                                    "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    data = json.loads(evaluated.stdout)
    assert data["synthetic"] and len(data["findings"]) == 14
    assert data["mean_auroc"] == manifest.metrics["test"]["mean_auroc"], "same model, same split, same numbers"


def test_evaluate_refuses_an_unknown_split(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--phantom", "holdout", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "holdout" in result.output
