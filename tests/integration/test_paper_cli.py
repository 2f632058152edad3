"""``chexd paper-table --quick --json`` on the bundled demo pair and the real CheXNet predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli import app
from model.paper import DATA_KINDS, VERDICTS

SHARED = Path(__file__).parents[3] / "shared" / "data"
PREDS = SHARED / "chexnet-preds"
NIH = SHARED / "nih" / "Data_Entry_2017_v2020.csv.gz"

CLAIMS = {
    "compression": 3,
    "correction": 4,
    "routing": 1,
    "calibration": 2,
    "finetune": 4,
    "polarized": 1,
}


def test_paper_table_quick_json_has_one_row_per_claim(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [k for k in os.environ if k.startswith("CHEXD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    args = ["paper-table", "--quick", "--json", "--chexnet-preds", str(PREDS), "--nih-labels", str(NIH)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert {s: sum(r["section"] == s for r in rows) for s in CLAIMS} == CLAIMS
    assert len({r["claim"] for r in rows}) == len(rows) == sum(CLAIMS.values())
    for r in rows:
        assert {"claim", "value", "ci", "paper_value", "data", "verdict", "reason"} <= set(r)
        assert r["verdict"] in VERDICTS and r["data"] in DATA_KINDS and r["reason"]
        assert r["paper_value"] is not None
        if r["data"] == "structural":
            assert r["verdict"] != "reproduced"
    by_claim = {r["claim"]: r for r in rows}
    youden = by_claim["Youden thresholds: F1 x1.6 vs threshold 0.5"]
    assert youden["data"] == "real CheXNet predictions" and youden["value"] > 1 and youden["ci"] is not None
    assert by_claim["zero AUROC change on the other 13 findings"]["verdict"] == "true by construction"
    assert by_claim["18K trainable parameters"]["value"] == 14 * 1024 + 14
    assert by_claim["latency 15.17 -> 14.73 ms"]["verdict"] == "not measurable here"  # CPU vs the paper's GPU
    assert "NIH labels" in by_claim["polarized channels: Jaccard < 0.1 in 89 of 100"]["source"]
    assert data["synthetic_demo"] is True and "SYNTHETIC" in data["note"]


def test_paper_table_without_predictions_says_what_to_give(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["paper-table", "--quick", "--chexnet-preds", "/nonexistent"])
    assert result.exit_code == 2 and "--nih-labels" in result.output
    result = CliRunner().invoke(app, ["paper-table", "--json", "--markdown"])
    assert result.exit_code == 2 and "one of --json and --markdown" in result.output
