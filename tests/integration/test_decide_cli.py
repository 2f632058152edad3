"""``chexd decide`` run as a user runs it (in this process: no second torch import), against a real registry.

Model mode uses the bundled compressed demo model with its Infiltration threshold broken on purpose (0.995: almost
nothing is called), so an operating-point problem exists by design; the validation source is a small phantom (160
images rendered at 64 px). Predictions mode uses a constructed predictions CSV.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner, Result

from daemon.cli import app
from daemon.store.tables import AdminJob, ModelVersion
from model.artifact import load_artifact, read_manifest, save_artifact
from model.types import LABELS

DEMO = Path(__file__).parents[2] / "model" / "demo" / "chexd-demo-compressed.json"


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with Infiltration's threshold at 0.995 (everything else as bundled)."""
    network, m = load_artifact(DEMO)
    thresholds = dict(m.thresholds) | {"Infiltration": 0.995}
    return save_artifact(
        network,
        tmp_path_factory.mktemp("broken") / "demo",
        name=m.name,
        preprocessing=m.preprocessing,
        intended_use=m.intended_use,
        version=m.version,
        labels=m.labels,
        thresholds=thresholds,
        provenance=m.provenance,
        synthetic=True,
        dtype=m.dtype,
    )


def _invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> tuple[Result, dict | None]:
    for key in [k for k in os.environ if k.startswith("CHEXD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, list(args))
    try:
        data = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    except json.JSONDecodeError:
        data = None
    return result, data


def _rows(tmp_path: Path, table: type) -> list:
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'chexd.db'}")
    with engine.connect() as conn:
        return list(conn.execute(select(table)))


def _feedback(tmp_path: Path) -> None:
    """Two stored phantom images that a radiologist marked absent for Effusion."""
    import pydicom
    from pydicom.uid import DigitalXRayImageStorageForProcessing

    from daemon.edge.intake import inspect
    from daemon.settings import Settings
    from daemon.store.feedback import record
    from daemon.store.instances import InstanceStore
    from daemon.store.registry import registry_sessions
    from daemon.store.spool import Spool
    from model.phantom import generate
    from tests.dicomgen import make_dataset, write_dataset

    settings = Settings(data_dir=tmp_path / "data")
    sessions = registry_sessions(settings)
    store = InstanceStore(Spool(settings.spool_dir, settings.quarantine_dir), sessions)
    for i in range(2):
        pixel = np.rint(generate(5, i, size=64).image * 65535).astype(np.uint16)
        ds = make_dataset(
            sop_class=DigitalXRayImageStorageForProcessing, pixel=pixel, bits=16, patient_id=f"CHEXD-FB-{i}"
        )
        path = write_dataset(ds, tmp_path / f"fb{i}.dcm")
        ds = pydicom.dcmread(path)
        store.save(inspect(ds, str(ds.file_meta.TransferSyntaxUID)), path.read_bytes(), "TESTSCU")
        record(sessions, str(ds.SOPInstanceUID), "Effusion", present=False, user="test")


def test_decide_routes_and_apply_registers_one_candidate_with_the_routing_table(
    broken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _feedback(tmp_path)
    result, data = _invoke(
        monkeypatch,
        tmp_path,
        "decide",
        "--model",
        str(broken),
        "--count",
        "160",
        "--render-size",
        "64",
        "--n-bootstrap",
        "200",
        "--feedback",
        "--json",
        "--apply",
    )
    assert result.exit_code == 0, result.output
    assert data is not None and data["mode"] == "model" and len(data["routes"]) == 14
    assert data["split"]["kind"] == "patient"
    routes = {r["finding"]: r for r in data["routes"]}
    infiltration = routes["Infiltration"]
    assert infiltration["problem"] == "operating_point" and infiltration["intervention"] == "threshold"
    effect = infiltration["chosen"]["effect"]
    assert effect["metric"] == "F1" and effect["ci"][0] > 0, "the threshold's effect is verified on held-out images"
    assert routes["Hernia"]["intervention"] == "needs_data" and routes["Hernia"]["problem"] == "too_few_positives"
    assert data["feedback_images"] == 2 and data["settings"]["feedback"] == {"Effusion": 2}

    # --apply: one candidate, the routing table in its manifest, each step in its provenance, nothing activated
    candidate = data["candidate"]
    assert candidate is not None and candidate["state"] == "candidate"
    manifest = read_manifest(candidate["path"])
    parent = read_manifest(broken)
    table = manifest.metrics["decide"]
    assert [r["finding"] for r in table["routes"]] == list(LABELS)
    assert {r["finding"]: r["intervention"] for r in table["routes"]} == {
        f: r["intervention"] for f, r in routes.items()
    }
    operations = [p["operation"] for p in manifest.provenance]
    assert operations[: len(parent.provenance)] == [p["operation"] for p in parent.provenance]
    assert operations[-1] == "decide" and "decide:threshold" in operations[len(parent.provenance) :]
    changed = {f for f in LABELS if manifest.thresholds[f] != parent.thresholds[f]}
    assert changed == {r["finding"] for r in data["routes"] if r["intervention"] == "threshold"}
    assert manifest.thresholds["Infiltration"] == pytest.approx(infiltration["chosen"]["change"]["threshold_to"])
    assert table["saved_artifact"]["backbone_identical"] and table["saved_artifact"]["untouched_rows_identical"]

    versions = {row.state: row for row in _rows(tmp_path, ModelVersion)}
    assert versions["candidate"].version == candidate["version"] and "active" in versions
    assert versions["active"].version != candidate["version"], "decide never activates"
    jobs = _rows(tmp_path, AdminJob)
    assert [(j.kind, j.state) for j in jobs] == [("decide", "done")]
    assert jobs[0].result["candidate"] == candidate["version"]


def _predictions(tmp_path: Path) -> tuple[Path, Path]:
    """400 images of 200 patients: Atelectasis ranks well but sits far below 0.5 (a threshold problem), Effusion
    scores are noise (weak ranking), the rest rank well around 0.5."""
    rng = np.random.default_rng(3)
    n = 400
    labels = (rng.random((n, 14)) < 0.25).astype(int)
    scores = np.clip(0.5 + 0.35 * (labels - 0.5) + rng.normal(0, 0.1, (n, 14)), 0.001, 0.999)
    a, e = LABELS.index("Atelectasis"), LABELS.index("Effusion")
    scores[:, a] = 0.05 + 0.2 * labels[:, a] + rng.uniform(0, 0.1, n)
    scores[:, e] = rng.uniform(0, 1, n)
    preds, truth = tmp_path / "preds.csv", tmp_path / "labels.csv"
    with open(preds, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{label}" for label in LABELS)])
        writer.writerows([f"img{i}.png", *(f"{v:.6f}" for v in scores[i])] for i in range(n))
    with open(truth, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Patient ID", *LABELS])
        writer.writerows([f"img{i}.png", f"p{i // 2}", *labels[i]] for i in range(n))
    return preds, truth


def test_predictions_only_routes_thresholds_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preds, truth = _predictions(tmp_path)
    result, data = _invoke(
        monkeypatch,
        tmp_path,
        "decide",
        "--predictions",
        str(preds),
        "--labels",
        str(truth),
        "--n-bootstrap",
        "200",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert data is not None and data["mode"] == "predictions" and "only thresholds can be routed" in data["note"]
    routes = {r["finding"]: r for r in data["routes"]}
    assert routes["Atelectasis"]["intervention"] == "threshold"
    assert routes["Effusion"]["problem"] == "weak_ranking" and routes["Effusion"]["intervention"] == "needs_data"
    assert {r["intervention"] for r in data["routes"]} <= {"threshold", "needs_data", "none"}
    assert data["candidate"] is None

    result, _ = _invoke(monkeypatch, tmp_path, "decide", "--predictions", str(preds), "--labels", str(truth), "--apply")
    assert result.exit_code == 2 and "--apply" in result.output
    result, _ = _invoke(monkeypatch, tmp_path, "decide", "--predictions", str(preds), "--labels", str(truth))
    assert result.exit_code == 0 and "only thresholds can be routed" in result.output
    assert "Atelectasis" in result.output and "threshold" in result.output
