"""``chexd correct`` and ``chexd finetune`` against a real registry, spool and database.

The model is the unit tests' small phantom-trained DenseNet with an injected grid-line false positive
(tests/gridmodel.py, trained once per session by tests/conftest.py's ``grid_model``); it is the configured model
(``CHEXD_MODEL_PATH``), so it is the active baseline.
False positives are given as a PNG file and as the SOP Instance UID of a DICOM image stored in the spool.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForProcessing
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import correct as correct_cli
from daemon.edge.intake import inspect
from daemon.settings import Settings
from daemon.store.instances import InstanceStore
from daemon.store.registry import list_versions, registry_sessions
from daemon.store.spool import Spool
from daemon.store.tables import AdminJob
from daemon.work.worker import read_stored_image
from model.artifact import diff_artifacts, load_artifact, read_manifest, save_artifact
from model.engine import Engine
from model.phantom import generate
from model.preprocess import decode_file
from model.types import LABELS
from tests.dicomgen import make_dataset, write_dataset
from tests.gridmodel import RECIPE, RENDER, USE, grid_lines, phantom_indices
from tests.nets import one_thread

E = LABELS.index("Effusion")
# The small grid model detects 7-8 of the 17 held-out Effusion positives of 300 phantom images (which, depends on the
# tests run before it in the process - tracked as an issue); the default minimum of
# held-out true positives (10) would refuse every edit, and with more images the channel search loses selection TPs.
# The mechanics are under test here, so these runs lower the minimum explicitly (the refusal itself is tested below).
FEW = ("--min-positives", "6")


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def settings(tmp_path: Path, grid_model: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> Settings:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CHEXD_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CHEXD_MODEL_PATH", str(grid_model[0]))
    monkeypatch.delenv("CHEXD_CONFIG", raising=False)
    monkeypatch.delenv("CHEXD_DATABASE_URL", raising=False)
    return Settings(data_dir=data_dir, model_path=str(grid_model[0]))


def _app() -> typer.Typer:
    """The chexd app when it registers these commands, else an app with just them."""
    from daemon.cli import app

    if {"correct", "finetune"} <= {c.name for c in app.registered_commands}:
        return app
    local = typer.Typer()
    local.command("correct")(correct_cli.correct)
    local.command("finetune")(correct_cli.finetune)
    return local


def _invoke(*args: str) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(_app(), list(args))
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return result.exit_code, data, result.output


def _stored(image: np.ndarray) -> np.ndarray:
    return np.rint(image * 65535).astype(np.uint16)


def _png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(_stored(image)).save(path)
    return path


def _dicom(image: np.ndarray, path: Path, patient: str) -> tuple[Path, str]:
    """A DX For Processing file (no VOI window: decoding maps its own min..max to [0, 1])."""
    ds = make_dataset(sop_class=DigitalXRayImageStorageForProcessing, pixel=_stored(image), bits=16,
                      patient_id=patient)
    return write_dataset(ds, path), str(ds.SOPInstanceUID)


def _store(settings: Settings, path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    store = InstanceStore(Spool(settings.spool_dir, settings.quarantine_dir), registry_sessions(settings))
    store.save(inspect(ds, str(ds.file_meta.TransferSyntaxUID)), path.read_bytes(), "TESTSCU")


def _p_effusion(model: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    engine = Engine(model, recipe=RECIPE, model_version="test", device="cpu")
    return np.array([p.probabilities[E] for p in engine.predict(images)])


def _jobs(settings: Settings) -> list[AdminJob]:
    with registry_sessions(settings)() as session:
        return list(session.scalars(select(AdminJob).order_by(AdminJob.id)))


def test_correct_removes_the_false_positive_and_registers_a_verified_candidate(
    settings: Settings, grid_model: tuple[Path, int], tmp_path: Path
) -> None:
    parent_path, channel = grid_model
    parent, parent_manifest = load_artifact(parent_path)
    samples = [generate(0, i, size=RENDER) for i in phantom_indices("train", 600)[560:]]
    negatives = [grid_lines(s.image) for s in samples if s.labels[E] == 0][:2]
    png = _png(negatives[0], tmp_path / "fp.png")
    dcm, uid = _dicom(negatives[1], tmp_path / "fp.dcm", patient="CHEXD-FP-0002")
    _store(settings, dcm)
    as_read = [decode_file(png), read_stored_image(dcm)[1]]  # decoded as the command decodes them
    assert (_p_effusion(parent, as_read) >= 0.5).all(), "both images are false positives of the active model"

    code, data, output = _invoke("correct", "--finding", "Effusion", "--false-positive", str(png),
                                 "--false-positive", uid, "--count", "300", "--render-size", str(RENDER), *FEW,
                                 "--json")
    assert code == 0, output
    assert data is not None and channel in data["channels"] and len(data["channels"]) <= 5
    v = data["verification"]
    assert [t["id"] for t in v["targets"]] == [str(png), uid]
    assert all(t["probability_before"] >= 0.5 > t["probability_after"] for t in v["targets"])
    assert v["true_positives"] > 0 and v["true_positives_lost"] == 0
    assert v["other_findings_bit_identical"] and len(v["other_findings_checked"]) == 13
    saved = data["saved_artifact"]
    assert saved["verification"]["passed"] and saved["backbone_identical"]
    assert saved["changed_weights"] == len(data["channels"]) and saved["dtype"] == "float16"
    assert data["features_from_cache"] is False

    versions = {v.state: v for v in list_versions(settings)}
    candidate = versions["candidate"]
    assert candidate.version == data["candidate"]["version"] and candidate.operation == "correct"
    assert versions["active"].version == parent_manifest.version_id, "the active model is unchanged"
    manifest = read_manifest(candidate.path)
    assert manifest.provenance[-1]["operation"] == "correct"
    assert manifest.provenance[-1]["parent_sha256"] == parent_manifest.weights_sha256
    assert manifest.provenance[-1]["parameters"]["false_positives"] == [str(png), uid]
    assert manifest.metrics["correct"]["channels"] == data["channels"]
    assert manifest.thresholds == parent_manifest.thresholds and manifest.version != parent_manifest.version
    diff = diff_artifacts(parent_path, candidate.path)
    assert diff["classifier_changes"] == {"Effusion": len(data["channels"])} and not diff["backbone_changed"]

    # through the daemon's inference path: the cases are fixed, the other findings did not move at all
    child, _ = load_artifact(candidate.path)
    engines = [Engine(m, recipe=RECIPE, model_version="test", device="cpu") for m in (parent, child)]
    before, after = (e.predict(as_read) for e in engines)
    for b, a in zip(before, after, strict=True):
        assert a.probabilities[E] < 0.5 <= b.probabilities[E]
        others = [j for j in range(14) if j != E]
        assert np.array_equal(a.logits[others], b.logits[others])
    (job,) = _jobs(settings)
    assert job.kind == "correct" and job.state == "done" and job.result["candidate"] == candidate.version

    # the same validation source again: the features come from the cache
    code, again, output = _invoke("correct", "--finding", "Effusion", "--false-positive", str(png), "--count",
                                  "300", "--render-size", str(RENDER), *FEW, "--dry-run", "--json")
    assert code == 0, output
    assert again["features_from_cache"] is True and again["candidate"] is None


@pytest.fixture(scope="module")
def validation_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list, np.ndarray]:
    """300 phantom val images as DICOM files with a labels CSV (patients kept: the split is patient-disjoint). The
    Effusion positives of the verification part (seed 0) carry grid lines, as if one site's effusions came through
    a grid: the held-out part has true positives that rely on the grid channel, the selection part has none.
    Returns (folder, labels CSV, samples, the split's verification mask)."""
    from model.verification import selection_split

    root = tmp_path_factory.mktemp("validation")
    folder = root / "dicom"
    folder.mkdir()
    samples = [generate(0, i, size=RENDER) for i in phantom_indices("val", 300)]
    parts = selection_split([s.patient_id for s in samples], np.stack([s.labels for s in samples]), seed=0)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "Patient ID", "Finding Labels"])
        for i, s in enumerate(samples):
            image = grid_lines(s.image) if parts.verification[i] and s.labels[E] else s.image
            _dicom(image, folder / f"{i}.dcm", patient=s.patient_id)
            names = [LABELS[c] for c in np.flatnonzero(s.labels)]
            writer.writerow([f"{i}.dcm", s.patient_id, "|".join(names) or "No Finding"])
    return folder, root / "labels.csv", samples, parts.verification


def _refused(settings: Settings, output: str, data: dict | None, code: int) -> dict:
    assert code == correct_cli.REFUSED == 3, output
    assert data is not None and data["refused"] is True and data["candidate"] is None
    assert "correction refused" in output and "rule:" in output and "cheapest" in output
    assert [v.state for v in list_versions(settings) if v.state != "active"] == [], "nothing was registered"
    return data


def test_an_edit_that_loses_held_out_true_positives_is_refused_with_exit_3(
    settings: Settings, grid_model: tuple[Path, int], validation_folder: tuple[Path, Path, list, np.ndarray],
    tmp_path: Path,
) -> None:
    """A selection-part true positive given as a false positive cannot be removed without losing itself: the search
    refuses. A grid-line false positive can be removed on the selection part at no loss, but the verification
    part's effusions carry grid lines too: the held-out check sees the lost true positives and refuses."""
    from model.verification import MIN_POSITIVES

    folder, labels_csv, samples, verification = validation_folder
    parent, _ = load_artifact(grid_model[0])
    p = _p_effusion(parent, [decode_file(folder / f"{i}.dcm") for i in range(len(samples))])
    y = np.array([s.labels[E] for s in samples], bool)
    assert min((y & ~verification).sum(), (y & verification).sum()) >= MIN_POSITIVES
    strongest = max(np.flatnonzero(y & (p >= 0.5) & ~verification), key=lambda i: p[i])
    source = ["--dicom-dir", str(folder), "--labels", str(labels_csv), "--json"]

    code, data, output = _invoke("correct", "--finding", "Effusion", "--false-positive",
                                 str(folder / f"{strongest}.dcm"), *source)
    data = _refused(settings, output, data, code)
    assert "true positive" in data["reason"] and data["validation_images"] == 300
    assert [a["kind"] for a in data["alternatives"]] == ["threshold", "finetune"]
    assert data["alternatives"][0]["true_positives_lost"] >= 1
    assert data["split"]["selection_images"] + data["split"]["verification_images"] == 300
    assert data["split"]["kind"] == "patient" and data["held_out"] is None

    negatives = [s for s in (generate(0, i, size=RENDER) for i in phantom_indices("train", 600)[560:])
                 if s.labels[E] == 0]
    png = _png(grid_lines(negatives[0].image), tmp_path / "fp.png")
    code, data, output = _invoke("correct", "--finding", "Effusion", "--false-positive", str(png), *source)
    data = _refused(settings, output, data, code)
    assert grid_model[1] in data["channels"]
    assert data["verification"]["true_positives_lost"] == 0, "on the selection part nothing was lost"
    held_out = data["held_out"]
    assert held_out["verdict"] == "tp_loss" and not held_out["passed"]
    assert held_out["images"] == int(verification.sum()) and held_out["positives"] == int((y & verification).sum())
    assert held_out["true_positives"] == int((y & verification & (p >= 0.5)).sum())
    assert held_out["true_positives_lost"] >= 1 and held_out["tp_loss_rate"] > 0.02
    lo, hi = held_out["tp_loss_ci"]
    assert lo <= held_out["tp_loss_rate"] <= hi
    assert "held-out check failed (tp_loss)" in data["reason"] and "2.0%" in data["rule"]
    assert data["alternatives"][0]["kind"] == "threshold"
    assert data["features_from_cache"] is True
    jobs = _jobs(settings)
    assert [(j.kind, j.state) for j in jobs] == [("correct", "refused")] * 2
    assert jobs[1].result["refused"] is True and "tp_loss" in jobs[1].result["reason"]


def test_too_few_positives_in_a_part_is_refused_as_needing_data(settings: Settings, tmp_path: Path) -> None:
    samples = [generate(0, i, size=RENDER) for i in phantom_indices("train", 600)[560:]]
    png = _png(grid_lines(next(s for s in samples if s.labels[E] == 0).image), tmp_path / "fp.png")
    code, data, output = _invoke("correct", "--finding", "Effusion", "--false-positive", str(png), "--count", "60",
                                 "--render-size", str(RENDER), "--json")
    data = _refused(settings, output, data, code)
    assert data["reason"].startswith("too few positives") and "minimum 10" in data["reason"]
    assert [a["kind"] for a in data["alternatives"]] == ["needs_data"] and "needs more data" in output
    assert data["split"]["positives_selection"][E] < 10 or data["split"]["positives_verification"][E] < 10
    (job,) = _jobs(settings)
    assert job.state == "refused"


def test_radiologist_feedback_supplies_the_false_positives(settings: Settings, tmp_path: Path) -> None:
    from daemon.store.feedback import record

    samples = [generate(0, i, size=RENDER) for i in phantom_indices("train", 600)[560:]]
    negatives = [s for s in samples if s.labels[E] == 0][2:5]
    marked, _ = _dicom(grid_lines(negatives[0].image), tmp_path / "marked.dcm", patient="CHEXD-FB-1")
    clean, _ = _dicom(negatives[1].image, tmp_path / "clean.dcm", patient="CHEXD-FB-2")
    other, _ = _dicom(grid_lines(negatives[2].image), tmp_path / "other.dcm", patient="CHEXD-FB-3")
    uids = {}
    for path in (marked, clean, other):
        _store(settings, path)
        uids[path.stem] = str(read_stored_image(path)[0].SOPInstanceUID)
    sessions = registry_sessions(settings)
    record(sessions, uids["marked"], "Effusion", present=False, user="rad1")
    record(sessions, uids["clean"], "Effusion", present=False, user="rad1")  # right already: nothing to fix
    record(sessions, uids["other"], "Effusion", present=False, user="rad1")
    record(sessions, uids["other"], "Effusion", present=True, user="rad2")  # the newest verdict counts
    code, data, output = _invoke("correct", "--finding", "Effusion", "--from-feedback", "--count", "300",
                                 "--render-size", str(RENDER), *FEW, "--dry-run", "--json")
    assert code == 0, output
    assert [t["id"] for t in data["verification"]["targets"]] == [uids["marked"]]
    assert data["verification"]["passed"] and data["candidate"] is None


def test_correct_help_names_the_refusal_exit_status() -> None:
    result = CliRunner().invoke(_app(), ["correct", "--help"])
    assert result.exit_code == 0 and "Exit 3" in result.output


def test_finetune_trains_only_the_head_and_registers_a_candidate(
    settings: Settings, grid_model: tuple[Path, int], tmp_path: Path
) -> None:
    model, _ = load_artifact(grid_model[0])
    with torch.no_grad():  # a head that is off: every bias 1.5 too high (as after a change of population)
        model.classifier.bias += 1.5
    off = save_artifact(model, tmp_path / "off", name="grid-off", preprocessing=RECIPE, intended_use=USE,
                        synthetic=True, dtype="float16")
    code, data, output = _invoke("finetune", "--model", str(off), "--train-images", "150", "--val-images", "60",
                                 "--render-size", str(RENDER), "--max-epochs", "60", "--patience", "5", "--lr", "0.01",
                                 "--json")
    assert code == 0, output
    assert data is not None and data["train_images"] == 150 and data["val_images"] == 60
    assert 1 <= data["best_epoch"] <= data["epochs"] <= 60 and len(data["per_class"]) == 14
    assert data["val_loss_after"] < data["val_loss_before"] and data["seconds"] >= 0
    assert data["saved_artifact"]["backbone_identical"] is True and data["saved_artifact"]["changed_weights"] > 0
    candidate = next(v for v in list_versions(settings) if v.state == "candidate")
    assert candidate.version == data["candidate"]["version"] and candidate.operation == "finetune"
    written = read_manifest(candidate.path)
    assert written.provenance[-1]["operation"] == "finetune"
    assert written.provenance[-1]["parameters"]["train_images"] == 150
    assert written.provenance[-1]["parent_sha256"] == read_manifest(off).weights_sha256
    diff = diff_artifacts(off, candidate.path)
    assert not diff["backbone_changed"] and diff["classifier_changes"]
    (job,) = _jobs(settings)
    assert job.kind == "finetune" and job.state == "done" and job.result["candidate"] == candidate.version

    # a learning rate that only makes things worse: the head is kept and nothing new is registered
    code, data, output = _invoke("finetune", "--model", str(off), "--train-images", "150", "--val-images", "60",
                                 "--render-size", str(RENDER), "--max-epochs", "10", "--patience", "2", "--lr", "50",
                                 "--json")
    assert code == 0, output
    assert data["best_epoch"] == 0 and data["candidate"] is None and "nothing was registered" in data["message"]
    assert data["features_from_cache"] is True
    assert len(list_versions(settings)) == 2
