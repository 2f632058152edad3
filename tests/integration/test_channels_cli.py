"""``chexd channels`` on the bundled demo model: JSON with the phantom's labels, the table with a labels CSV."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from daemon.cli import app
from model.types import LABELS

DEMO = Path(__file__).parents[2] / "model" / "demo" / "chexd-demo.safetensors"


def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> Result:
    for key in [k for k in os.environ if k.startswith("CHEXD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    return CliRunner().invoke(app, ["channels", "--model", str(DEMO), *args])


def test_channels_json_reports_the_top_channels_and_both_nulls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = invoke(monkeypatch, tmp_path, "--count", "300", "--top", "20", "--draws", "200", "--seed", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["synthetic"] is True and data["model"]["name"] == "chexd-demo"
    assert data["n_findings"] == 14 and data["n_channels"] == 1024 and data["top_requested"] == 20
    assert "phantom val split labels" in data["label_source"] and data["n_images"] == 300
    assert len(data["channels"]) == 20 and [c["rank"] for c in data["channels"]] == list(range(1, 21))
    scores = [c["score"] for c in data["channels"]]
    assert scores == sorted(scores, reverse=True)
    first = data["channels"][0]
    assert first["positive"] in LABELS and first["negative"] in LABELS and first["positive"] != first["negative"]
    assert first["positive_weight"] > 0 > first["negative_weight"]
    assert {"jaccard", "lift", "n_both", "expected_both", "lift_counted"} <= set(first)
    assert data["base_rate"]["pairs"] == 91 and data["observed"]["channels"] == 20
    null = data["null"]
    assert (null["method"], null["draws"], null["seed"]) == ("row-permutation", 200, 4)
    assert null["p_lift"] is None or 1 / 201 <= null["p_lift"] <= 1
    assert data["verdict"] in ("supported", "not supported", "undefined")
    assert len(data["label_pairs"]["pairs"]) == 91


def test_channels_table_with_a_labels_csv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for i in range(200):  # Effusion and Edema never together, the rest cycles through pairs
            names = [LABELS[i % 14], LABELS[(i // 14) % 14]]
            if {"Effusion", "Edema"} <= set(names):
                names = ["No Finding"]
            writer.writerow([f"{i:05d}.png", "|".join(dict.fromkeys(names)), str(i // 3)])
    result = invoke(monkeypatch, tmp_path, "--labels", str(path), "--top", "10", "--draws", "100", "--rows", "5")
    assert result.exit_code == 0, result.output
    assert "labels file labels.csv (200 images)" in result.stdout
    assert "showing 5 of 10" in result.stdout and "Null (a), all 91 finding pairs" in result.stdout
    assert "weight rows permuted" in result.stdout and "synthetic demo model" in result.stdout
    bad = invoke(monkeypatch, tmp_path, "--labels", str(tmp_path / "missing.csv"))
    assert bad.exit_code == 2 and "missing.csv: no such file" in bad.output
