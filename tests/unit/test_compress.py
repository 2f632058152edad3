"""Compression of a tiny phantom-trained DenseNet: a real smaller network that loads from its manifest alone, refit
beats pruning without refit, predictions follow the original; the selection algebra; the paired bootstrap; the CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from model.artifact import load_artifact, read_manifest, save_artifact
from model.complexity import complexity
from model.compress import (
    CompressionError,
    _eliminate,
    _Stats,
    compress,
    compression_verdict,
    distill,
    paired_auroc_delta,
    predict_logits,
)
from model.network import Architecture, DenseNet
from model.train import render_split
from model.types import LABELS, PreprocessRecipe

SIZE = 64
RECIPE = PreprocessRecipe(input_size=SIZE, resize=None)
ROWS = 4096  # calibration positions per fit: plenty for the tiny network's convs (at most 24 inputs x 9)


@pytest.fixture(scope="module")
def phantom():
    train = render_split("train", seed=0, count=160, recipe=RECIPE, render_size=SIZE)
    test = render_split("test", seed=0, count=48, recipe=RECIPE, render_size=SIZE)
    return train, test


@pytest.fixture(scope="module")
def tiny(phantom) -> DenseNet:
    """The tiny DenseNet, briefly trained on phantom images so that its BatchNorm statistics and weights are real."""
    train, _ = phantom
    torch.manual_seed(0)
    model = DenseNet(Architecture.tiny())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.x.float(), torch.from_numpy(train.y).float()
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(40):
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def compressed(tiny, phantom):
    train, _ = phantom
    return compress(tiny, train.x, target_params=0.6, target_macs=None, rows=ROWS)


def _weights(model: DenseNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight")}


def test_result_is_a_real_smaller_network(tiny, compressed) -> None:
    model, report = compressed
    arch = model.architecture
    assert report.parameters_before == tiny.architecture.parameters()
    assert report.parameters_after == arch.parameters() == sum(p.numel() for p in model.parameters())
    assert report.parameters_after <= 0.6 * report.parameters_before
    assert report.macs_after == complexity(arch, SIZE).macs < report.macs_before
    assert arch.pool_first  # the exact reorder: transitions pool before their conv
    assert report.macs_before_pool_first == complexity(replace(tiny.architecture, pool_first=True), SIZE).macs
    assert report.macs_after < report.macs_before_pool_first < report.macs_before
    layers = [layer for block in arch.blocks for layer in block]
    narrower = any(layer.bottleneck < 8 or layer.growth < 4 or layer.kept_inputs is not None for layer in layers)
    assert narrower and arch != tiny.architecture
    # channels are gone, not masked: no conv keeps an all-zero filter
    for key, w in _weights(model).items():
        if w.ndim == 4:
            assert (w.flatten(1).abs().sum(1) > 0).all(), key
    # the model still does what a chexd DenseNet does
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        logits = model(x)
        from_features = model.classifier(model.forward_features(x).mean((2, 3)))
    assert logits.shape == (2, 14)
    torch.testing.assert_close(logits, from_features, rtol=1e-5, atol=1e-5)


def test_compressed_network_loads_from_its_manifest_alone(compressed, phantom, tmp_path: Path) -> None:
    model, _ = compressed
    _, test = phantom
    path = save_artifact(
        model, tmp_path / "small", name="tiny-small", preprocessing=RECIPE, intended_use="unit test", dtype="float32"
    )
    manifest = read_manifest(path)
    assert manifest.architecture == model.architecture
    assert manifest.parameters == model.architecture.parameters()
    loaded, _ = load_artifact(path)  # a fresh process would only have these two files
    assert loaded.architecture == model.architecture
    torch.testing.assert_close(predict_logits(loaded, test.x), predict_logits(model, test.x), rtol=0, atol=1e-5)


def test_least_squares_refit_beats_pruning_without_refit(tiny, compressed, phantom) -> None:
    model, report = compressed
    train, test = phantom
    pruned = [u for u in report.units if u.kept < u.total]
    assert pruned, "the target must have removed channels"
    for unit in pruned:  # on the calibration images, per conv
        assert unit.error < unit.error_without_refit, unit
    # the same selection procedure keeping the original weights is further from the original on unseen images
    baseline, baseline_report = compress(tiny, train.x, target_params=0.6, target_macs=None, refit=False, rows=ROWS)
    reference = predict_logits(tiny, test.x)
    refit_rmse = (predict_logits(model, test.x) - reference).pow(2).mean().sqrt()
    baseline_rmse = (predict_logits(baseline, test.x) - reference).pow(2).mean().sqrt()
    assert refit_rmse < baseline_rmse


def test_mild_compression_keeps_the_predictions(tiny, phantom) -> None:
    """Stated tolerance: at 80% of the parameters, every phantom test probability within 0.1 of the original's and
    the mean absolute difference below 0.02. (The tiny net has 5,174 parameters and little redundancy; measured when
    this test was written: max 0.066, mean 0.013 with the refit, max 0.24, mean 0.094 with the same pruning without.)"""
    train, test = phantom
    model, report = compress(tiny, train.x, target_params=0.8, target_macs=None, rows=ROWS)
    assert report.parameters_after <= 0.8 * report.parameters_before
    before = torch.sigmoid(predict_logits(tiny, test.x))
    after = torch.sigmoid(predict_logits(model, test.x))
    diff = (after - before).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_aggressive_compression_still_builds_a_valid_network(tiny, phantom, tmp_path: Path) -> None:
    train, test = phantom
    # at 64 px the tiny net's unpruned 7x7 stem is 80% of its MACs
    model, report = compress(tiny, train.x, target_params=0.45, target_macs=0.9, rows=ROWS)
    assert report.parameters_after <= 0.45 * report.parameters_before
    assert report.macs_after <= 0.9 * report.macs_before
    path = save_artifact(model, tmp_path, name="tiny-small", preprocessing=RECIPE, intended_use="unit test")
    loaded, _ = load_artifact(path)
    assert torch.isfinite(predict_logits(loaded, test.x)).all()


def test_distillation_is_kept_only_when_it_helps(tiny, phantom) -> None:
    train, _ = phantom
    _, report = compress(
        tiny, train.x, target_params=0.5, target_macs=None, distill_steps=4, distill_batch_size=16, rows=ROWS
    )
    assert report.distill_steps == 4 and report.held_out_images == 16
    if report.distilled:
        assert report.logit_rmse < report.logit_rmse_before_distill
    else:
        assert report.logit_rmse == report.logit_rmse_before_distill


@pytest.mark.parametrize("scope", ["last_block", "last_2_blocks", "all"])
def test_distil_scope_trains_only_the_layers_after_its_cut(tiny, compressed, phantom, scope: str) -> None:
    train, test = phantom
    student = copy.deepcopy(compressed[0])
    before = copy.deepcopy(student.state_dict())
    reference = predict_logits(tiny, train.x[:64])
    error_before = float((predict_logits(student, train.x[:64]) - reference).pow(2).mean())
    out = distill(student, tiny, train.x[:64], steps=30, batch_size=16, lr=1e-3, scope=scope)
    assert out is student and not student.training
    changed = {k.split(".")[1] for k, v in student.state_dict().items() if k.startswith("features.")
               and v.is_floating_point() and not torch.equal(v, before[k])}
    trained = {"last_block": {"denseblock4", "norm5"}, "last_2_blocks": {"denseblock3", "transition3", "denseblock4",
               "norm5"}}.get(scope)
    error_after = float((predict_logits(student, train.x[:64]) - reference).pow(2).mean())
    if trained is not None:
        assert changed == trained
        assert error_after < error_before  # fitted on exactly these images (cached, not augmented): the error falls
    else:
        assert "conv0" in changed and "denseblock1" in changed  # "all" fits on shifted, scaled copies instead
    assert torch.isfinite(predict_logits(student, test.x)).all()


def test_distill_images_are_used_for_distillation(tiny, phantom) -> None:
    train, _ = phantom
    _, plain = compress(tiny, train.x[:40], target_params=0.6, target_macs=None, distill_steps=3, rows=ROWS,
                        distill_scope="last_2_blocks")
    _, more = compress(tiny, train.x[:40], target_params=0.6, target_macs=None, distill_steps=3, rows=ROWS,
                       distill_scope="last_2_blocks", distill_images=train.x[40:120])
    assert plain.logit_rmse_before_distill == more.logit_rmse_before_distill  # same selection and refit
    if plain.distilled or more.distilled:  # different images were distilled on: a different result
        assert plain.logit_rmse != more.logit_rmse
    with pytest.raises(CompressionError, match="distillation settings"):
        distill(DenseNet(Architecture.tiny()), tiny, train.x[:8], steps=0)


def test_original_model_is_not_changed(tiny, phantom) -> None:
    train, _ = phantom
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    compress(tiny, train.x[:40], target_params=0.7, target_macs=None, distill_steps=2, rows=ROWS)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_params": 1.2}, "target_params"),
        ({"target_params": 0.0}, "target_params"),
        ({"target_macs": 0.0}, "target_macs"),
        ({"distill_steps": -1}, "distill_steps"),
        ({"distill_scope": "last_5_blocks"}, "4 dense blocks"),  # the tiny net has four
        ({"distill_scope": "first_block"}, "distill_scope"),
        ({"distill_images": torch.zeros(4, 1, SIZE, SIZE)}, "distill_images"),
        ({"target_params": 0.9, "target_macs": 0.05}, "target_macs"),
        ({"target_params": 0.1}, "at least"),  # the tiny net's 7x7 stem alone is 23% of its parameters
    ],
)
def test_invalid_settings_are_refused(tiny, phantom, kwargs, message) -> None:
    train, _ = phantom
    with pytest.raises(CompressionError, match=message):
        compress(tiny, train.x[:20], **kwargs)


def test_invalid_calibration_images_are_refused(tiny, phantom) -> None:
    train, _ = phantom
    with pytest.raises(CompressionError, match="at least 16"):
        compress(tiny, train.x[:8])
    with pytest.raises(CompressionError, match=r"\[N, 3, S, S\]"):
        compress(tiny, train.x[:, :1])
    with pytest.raises(CompressionError, match="DenseNet"):
        compress(torch.nn.Linear(2, 2), train.x)  # type: ignore[arg-type]


@pytest.mark.parametrize("group", [1, 3])
def test_greedy_removal_cost_is_the_exact_increase_of_the_least_squares_residual(group: int) -> None:
    rng = np.random.default_rng(1)
    n_candidates, rows, outputs = 6, 400, 3
    x = rng.normal(size=(rows, n_candidates * group)) @ rng.normal(size=(n_candidates * group,) * 2)
    y = x[:, : 2 * group] @ rng.normal(size=(2 * group, outputs)) + 0.3 * rng.normal(size=(rows, outputs)) + 1.5
    stats = _Stats.of(torch.from_numpy(x), torch.from_numpy(y))

    def residual(candidates: list[int]) -> float:
        cols = [c * group + g for c in candidates for g in range(group)]
        design = np.concatenate([x[:, cols], np.ones((rows, 1))], 1)
        fit, *_ = np.linalg.lstsq(design, y, rcond=None)
        return float(((y - design @ fit) ** 2).sum())

    removed, costs = _eliminate(stats, n_candidates, group, 1)
    # the fits carry a tiny ridge (1e-4 of the mean feature energy): compare on the scale of the target's variance
    tolerance = 1e-3 * stats.variance
    alive = list(range(n_candidates))
    for candidate, cost in zip(removed, costs, strict=True):
        before = residual(alive)
        increases = {other: residual([a for a in alive if a != other]) - before for other in alive}
        assert increases[int(candidate)] == pytest.approx(cost, rel=1e-2, abs=tolerance)
        assert increases[int(candidate)] <= min(increases.values()) + tolerance  # greedy: the cheapest removal
        alive.remove(int(candidate))
    assert costs[-1] > 100 * costs[0]  # the two true predictors go last


def test_paired_auroc_delta_matches_sklearn_and_is_paired() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(300, 14))
    y[:, 13] = 0  # a label with one outcome has no AUROC
    before = y * 0.5 + rng.normal(size=y.shape)
    after = before + rng.normal(scale=0.05, size=y.shape)
    delta = paired_auroc_delta(before, after, y, LABELS, n_bootstrap=200)
    for c in range(13):
        assert delta.before[c] == pytest.approx(roc_auc_score(y[:, c], before[:, c]))
        assert delta.after[c] == pytest.approx(roc_auc_score(y[:, c], after[:, c]))
    assert delta.before[13] is None and delta.delta_ci[13] is None
    lo, hi = delta.mean_delta_ci
    assert lo <= delta.mean_delta <= hi
    # paired: a tiny perturbation gives a far narrower interval than either model's own AUROC spread
    assert hi - lo < 0.01
    same = paired_auroc_delta(before, before, y, LABELS, n_bootstrap=50)
    assert same.mean_delta == 0 and same.mean_delta_ci == (0.0, 0.0)
    better = paired_auroc_delta(before, y + 0.01 * before, y, LABELS, n_bootstrap=50)
    assert better.mean_delta_ci[0] > 0


def test_paired_auroc_delta_resamples_patients_and_reports_eligible_findings() -> None:
    rng = np.random.default_rng(1)
    n_patients = 150
    y = (rng.random((n_patients, 2)) < 0.4).astype(int)
    y[:3, 1], y[3:, 1] = 1, 0  # the second finding: 3 patients with it
    before = y * 0.8 + rng.normal(size=y.shape)
    after = before + rng.normal(scale=0.3, size=y.shape)
    # each patient's image appears 3 times: duplicated images must not narrow the interval
    rep = (np.repeat(a, 3, axis=0) for a in (y, before, after))
    y3, before3, after3 = rep
    patients = [f"P{i // 3}" for i in range(3 * n_patients)]
    labels = ("common", "rare")
    by_image = paired_auroc_delta(before3, after3, y3, labels, n_bootstrap=300, seed=2)
    by_patient = paired_auroc_delta(before3, after3, y3, labels, n_bootstrap=300, seed=2, patients=patients)
    assert by_image.resampled == "images" and by_patient.resampled == "patients"
    assert by_patient.delta == by_image.delta
    widths = [d.delta_ci[0][1] - d.delta_ci[0][0] for d in (by_image, by_patient)]
    assert widths[1] > 1.3 * widths[0], widths
    assert by_patient.positives == (int(y3[:, 0].sum()), 9) and by_patient.eligible == ("common",)
    assert by_patient.mean_delta_eligible == pytest.approx(by_patient.delta[0])
    assert by_patient.samples.shape == (300, 2)
    assert by_patient.to_dict()["findings"][1]["positives"] == 9


def _delta_with(shift: dict[int, float], *, n: int = 2000, rare: int = 3, seed: int = 0):
    """Scores of 4 findings on n images (one patient each); ``shift`` lowers the "after" model's score of a finding's
    positives, so its AUROC drops; finding 3 has only ``rare`` positives."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(int)
    y[:, 3] = 0
    y[:rare, 3] = 1
    before = y * 1.5 + rng.normal(size=y.shape)
    after = before + rng.normal(scale=0.02, size=y.shape)
    for c, value in shift.items():
        after[:, c] -= value * y[:, c]
    labels = ("A", "B", "C", "Rare")
    return paired_auroc_delta(before, after, y, labels, n_bootstrap=300, patients=[f"P{i}" for i in range(n)])


def test_compression_verdict_met_when_nothing_changes_and_rare_findings_are_excluded() -> None:
    verdict = compression_verdict(_delta_with({3: 3.0}))  # the rare finding collapses, but it has 3 positives
    assert verdict.verdict == "met" and verdict.met, verdict.reason
    assert verdict.judged == ("A", "B", "C") and verdict.excluded == (("Rare", 3),)
    assert verdict.failing == () and "not judged" in verdict.reason
    low, high = verdict.mean_delta_ci
    assert low <= 0 <= high or low > 0
    data = verdict.to_dict()
    assert data["excluded"] == [{"label": "Rare", "positives": 3}] and data["resampled"] == "patients"


def test_compression_verdict_not_met_for_a_finding_whose_ci_is_below_the_floor() -> None:
    delta = _delta_with({1: 0.5})
    assert delta.delta_ci[1][1] < -0.005
    verdict = compression_verdict(delta)
    assert verdict.verdict == "not met" and verdict.failing == ("B",) and "B" in verdict.reason
    assert "B" in verdict.below_zero
    # the same finding passes under a floor it stays above
    lenient = compression_verdict(delta, floor=delta.delta_ci[1][0] - 0.01)
    assert lenient.failing == ()
    with pytest.raises(ValueError, match="floor"):
        compression_verdict(delta, floor=0.01)


def test_compression_verdict_not_met_when_the_mean_ci_is_below_zero_without_any_failing_finding() -> None:
    delta = _delta_with({0: 0.05, 1: 0.05, 2: 0.05}, n=4000)
    verdict = compression_verdict(delta, floor=-0.05)
    assert verdict.failing == () and verdict.mean_delta_ci[1] < 0
    assert verdict.verdict == "not met" and "entirely below 0" in verdict.reason


def test_cli_registers_a_candidate_with_parameters_macs_and_provenance(tiny, tmp_path: Path, monkeypatch) -> None:
    from daemon.cli.compress import compress as compress_command
    from daemon.settings import load_settings
    from daemon.store.registry import list_versions

    parent = save_artifact(
        tiny,
        tmp_path / "parent",
        name="tiny",
        preprocessing=RECIPE,
        intended_use="synthetic demo model, not for diagnosis: unit test",
        synthetic=True,
        dtype="float32",
    )
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    app = typer.Typer()
    app.command()(compress_command)
    result = CliRunner().invoke(
        app,
        [
            "--model", str(parent), "--target-params", "0.6", "--target-macs", "1.0", "--calibration-images", "40",
            "--test-images", "40", "--n-bootstrap", "20", "--distill-steps", "2", "--distill-scope", "last_2_blocks",
            "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parameters_after"] <= 0.6 * summary["parameters_before"]
    assert summary["state"] == "candidate"
    lo, hi = summary["mean_auroc_delta_ci"]
    assert lo <= summary["mean_auroc_delta"] <= hi
    assert summary["latency"]["batch1_ms_after"] > 0
    manifest = read_manifest(Path(summary["path"]))
    assert manifest.metrics["parameters"] == manifest.parameters == summary["parameters_after"]
    assert manifest.metrics["macs"] == complexity(manifest.architecture, SIZE).macs
    assert manifest.synthetic and manifest.name == "tiny-compressed"
    step = manifest.provenance[-1]
    assert step["operation"] == "compress" and step["parameters"]["target_params"] == 0.6
    assert step["parameters"]["distill_scope"] == "last_2_blocks" and step["parameters"]["distill_steps"] == 2
    assert step["parent_sha256"] == read_manifest(parent).weights_sha256
    versions = list_versions(load_settings(None))
    assert [v.operation for v in versions if v.state == "candidate"] == ["compress"]


def test_cli_refuses_an_unknown_distill_scope(tiny, tmp_path: Path, monkeypatch) -> None:
    from daemon.cli.compress import compress as compress_command

    parent = save_artifact(
        tiny, tmp_path / "parent", name="tiny", preprocessing=RECIPE, synthetic=True, dtype="float32",
        intended_use="synthetic demo model, not for diagnosis: unit test",
    )  # fmt: skip
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    app = typer.Typer()
    app.command()(compress_command)
    args = ["--model", str(parent), "--calibration-images", "40", "--distill-steps", "2", "--distill-scope", "first"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "distill_scope" in result.output


def test_layers_nobody_reads_are_removed(tiny, phantom, tmp_path: Path) -> None:
    """Silence the last block's layers (zero conv2): the head has no use for their output, so they disappear (the
    block keeps one layer of one channel, as an Architecture needs) and the result still loads and predicts."""
    train, test = phantom
    model = copy.deepcopy(tiny)
    for layer in model.features.denseblock4.values():
        torch.nn.init.zeros_(layer.conv2.weight)
    small, _ = compress(model, train.x, target_params=0.6, target_macs=None, rows=ROWS)
    last = small.architecture.blocks[-1]
    assert sum(layer.growth for layer in last) < sum(layer.growth for layer in model.architecture.blocks[-1])
    loaded, _ = load_artifact(
        save_artifact(small, tmp_path, name="tiny-small", preprocessing=RECIPE, intended_use="unit test")
    )
    torch.testing.assert_close(
        predict_logits(loaded, test.x), predict_logits(small, test.x), rtol=0, atol=0.05
    )
