"""``chexd calibrate`` and ``chexd evaluate`` on validation folders, run as a user runs them (a subprocess)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner, Result

from daemon.cli import app
from daemon.store.tables import AdminJob, ModelVersion
from model.artifact import read_manifest, save_artifact
from model.phantom import generate, to_dicom
from model.types import LABELS, PreprocessRecipe
from tests.conftest import CHEXD
from tests.nets import tiny

DATA = Path(__file__).parents[2].parent / "shared" / "data"
PREDS = DATA / "chexnet-preds" / "preds.csv"
NIH_LABELS = DATA / "nih" / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return save_artifact(
        tiny(seed=3),
        tmp_path / "tiny",
        name="tiny",
        preprocessing=PreprocessRecipe(input_size=64, resize=None),
        intended_use="synthetic demo model, not for diagnosis (test fixture)",
        synthetic=True,
        dtype="float32",
        thresholds=dict.fromkeys(LABELS, 0.37),
    )


def chexd(tmp_path: Path, *args: str, model_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command in a fresh process, as a script would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
    env |= {"CHEXD_DATA_DIR": str(tmp_path / "data"), "CHEXD_MODEL_PATH": str(model_path or "")}
    return subprocess.run([*CHEXD, *args], capture_output=True, text=True, env=env, timeout=300)


def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str, model_path: Path | None = None) -> Result:
    """The command in this process (no second torch import: these tests stay fast); stderr is not a terminal."""
    for key in [k for k in os.environ if k.startswith("CHEXD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CHEXD_MODEL_PATH", str(model_path or ""))
    return CliRunner().invoke(app, list(args))


def _jobs(tmp_path: Path) -> list[AdminJob]:
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'chexd.db'}")
    with engine.connect() as conn:
        return list(conn.execute(select(AdminJob.kind, AdminJob.state, AdminJob.result)))


def test_predictions_mode_prints_one_json_object_and_changes_no_model(tmp_path: Path) -> None:
    result = chexd(tmp_path, "calibrate", "--predictions", str(PREDS), "--labels", str(NIH_LABELS),
                   "--objective", "f1", "--n-bootstrap", "50", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert data["objective"] == "f1" and data["images"] == 22433 and data["dropped_rows"] == 0
    assert data["f1_ratio"] > 1.4 and data["recall_ratio"] > 1.0 and len(data["f1_ratio_ci"]) == 2
    assert set(data["thresholds"]) == set(LABELS) and all(0 < t < 1 for t in data["thresholds"].values())
    finding = data["findings"][0]
    assert {"f1", "f1_ci", "recall", "recall_ci", "precision_ci", "f1_default", "threshold"} <= set(finding)
    assert data["candidate"] is None and data["model_changed"] is False and "no model was changed" in data["message"]
    assert data["split"] == "patient" and data["n_splits"] == 5 and len(data["splits"]) == 5
    assert "5 patient-disjoint splits" in data["note"] and "all 22433 images" in data["thresholds_source"]
    ((kind, state, job_result),) = _jobs(tmp_path)
    assert (kind, state) == ("calibrate", "done") and job_result["f1_ratio"] == data["f1_ratio"]


def test_a_bad_predictions_csv_fails_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "preds.csv"
    bad.write_text("Image Index,prob_Atelectasis\n00000001_000.png,0.3\n")
    result = invoke(monkeypatch, tmp_path, "calibrate", "--predictions", str(bad), "--labels", str(NIH_LABELS),
                    "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "probability column(s) missing: Cardiomegaly" in result.stderr
    ((_, state, _),) = _jobs(tmp_path)
    assert state == "failed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calibrate", "--predictions", "p.csv"], "--predictions needs --labels"),
        (["calibrate", "--objective", "auc"], "'auc'"),
        (["calibrate", "--predictions", "p.csv", "--labels", "l.csv", "--phantom", "val"], "--phantom"),
        (["calibrate", "--labels", "l.csv"], "--labels goes with --dicom-dir"),
        (["evaluate", "--chestxray14", "x", "--phantom", "test"], "choose one validation source"),
        (["evaluate", "--dicom-dir", "x"], "--dicom-dir needs --labels"),
    ],
)
def test_conflicting_options_exit_2_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    result = invoke(monkeypatch, tmp_path, *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_model_mode_registers_a_candidate_with_the_fitted_thresholds(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = read_manifest(model)
    result = invoke(monkeypatch, tmp_path, "calibrate", "--phantom", "val", "--count", "40", "--device", "cpu",
                    "--n-bootstrap", "20", "--splits", "2", "--json", model_path=model)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "score images: 40/40" in result.stderr, "plain progress lines when stderr is not a terminal"
    candidate = read_manifest(Path(data["candidate"]["path"]))
    assert data["candidate"]["state"] == "candidate" and data["model"]["version"] == parent.version_id
    assert candidate.thresholds == pytest.approx(data["thresholds"])
    assert candidate.weights_sha256 == parent.weights_sha256, "only the thresholds change"
    assert candidate.provenance[-1]["operation"] == "calibrate"
    assert candidate.provenance[-1]["parent_sha256"] == parent.weights_sha256
    assert candidate.metrics["calibration"]["date"] and candidate.metrics["calibration"]["images"] == 40
    assert candidate.metrics["calibration"]["n_splits"] == 2 and data["n_splits"] == 2
    assert candidate.metrics["calibration"]["saved_artifact"]["weights_identical"] is True
    assert candidate.synthetic and candidate.version == "1.0.1"
    for finding in data["findings"]:  # 40 images: rare findings have no positive in the fit half
        if not finding["fitted"]:
            assert finding["threshold"] == 0.37, "the parent's threshold is kept"
    assert any(f["fitted"] for f in data["findings"])
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'chexd.db'}")
    with engine.connect() as conn:
        states = dict(conn.execute(select(ModelVersion.version, ModelVersion.state)).all())
    assert states == {parent.version_id: "active", candidate.version_id: "candidate"}, "the active model is unchanged"
    assert [(k, s) for k, s, _ in _jobs(tmp_path)] == [("calibrate", "done")]


def test_model_mode_table_and_dry_run(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(monkeypatch, tmp_path, "calibrate", "--count", "20", "--device", "cpu", "--n-bootstrap", "0",
                    "--objective", "f1", "--dry-run", model_path=model)
    assert result.exit_code == 0, result.output
    assert "Cardiomegaly" in result.stdout and "dry run: no candidate was written" in result.stdout
    assert "phantom val split" in result.stdout and "NOT FOR DIAGNOSIS" in result.stdout
    assert "5 patient-disjoint split(s) (seeds 0-4)" in result.stdout
    assert not (tmp_path / "data" / "models").exists() or not any(
        "1.0.1" in p.read_text() for p in (tmp_path / "data" / "models").rglob("*.json")
    )


@pytest.fixture
def chestxray14(tmp_path: Path) -> Path:
    root = tmp_path / "cxr14"
    (root / "images").mkdir(parents=True)
    with open(DATA / "real-cxr" / "nih" / "labels.csv", newline="") as fh:
        names = [row["Image Index"] for row in csv.DictReader(fh)]
    for name in names:
        shutil.copy(DATA / "real-cxr" / "nih" / name, root / "images" / name)
    shutil.copy(DATA / "real-cxr" / "nih" / "labels.csv", root / "Data_Entry_2017.csv")
    (root / "test_list.txt").write_text("\n".join(names[:20]))
    (root / "train_val_list.txt").write_text("\n".join(names[20:]))
    return root


def test_evaluate_on_a_chestxray14_folder(
    tmp_path: Path, model: Path, chestxray14: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = invoke(monkeypatch, tmp_path, "evaluate", "--model", str(model), "--chestxray14", str(chestxray14),
                    "--split", "test", "--device", "cpu", "--n-bootstrap", "20", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 20 and "ChestX-ray14 test" in data["source"]
    assert len(data["findings"]) == 14 and "mean_auroc" in data
    assert all(f["threshold"] == 0.37 and f["n"] == 20 for f in data["findings"]), "the artifact's thresholds"
    missing = invoke(monkeypatch, tmp_path, "evaluate", "--model", str(model), "--chestxray14", str(tmp_path / "no"))
    assert missing.exit_code == 1 and "no such folder" in missing.stderr


def test_evaluate_and_calibrate_on_a_dicom_folder(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    rows = []
    for i in range(12):
        sample = generate(2, i, size=64)
        ds = to_dicom(sample)
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        rows.append([ds.SOPInstanceUID, "|".join(n for n, v in zip(LABELS, sample.labels, strict=True) if v)
                     or "No Finding"])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["SOPInstanceUID", "Finding Labels"], *rows])
    result = invoke(monkeypatch, tmp_path, "evaluate", "--model", str(model), "--dicom-dir", str(folder),
                    "--labels", str(labels), "--device", "cpu", "--n-bootstrap", "20")
    assert result.exit_code == 0, result.output
    assert "DICOM folder" in result.stdout and "mean AUROC" in result.stdout
    calibrated = invoke(monkeypatch, tmp_path, "calibrate", "--dicom-dir", str(folder), "--labels", str(labels),
                        "--device", "cpu", "--dry-run", "--json", model_path=model)
    assert calibrated.exit_code == 0, calibrated.output
    data = json.loads(calibrated.stdout)
    assert data["n_fit"] + data["n_report"] == 12 and data["split"] == "patient", "PatientID from the files"
