"""The worker runs the configured model: a C-STORE ends as a stored prediction (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import func, select

from daemon.store.tables import Instance, PredictionRow
from model.artifact import save_artifact
from model.types import LABELS, PreprocessRecipe
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.peers import wait_until_processed
from tests.nets import tiny


def _artifact(tmp_path: Path) -> Path:
    return save_artifact(
        tiny(seed=3),
        tmp_path / "tiny-model",
        name="tiny-test-model",
        preprocessing=PreprocessRecipe(input_size=64, resize=None),
        intended_use="synthetic demo model, not for diagnosis (test fixture)",
        synthetic=True,
        dtype="float32",
    )


def test_stored_image_gets_a_prediction_and_reprocessing_replaces_it(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(model_path=str(_artifact(tmp_path)), model_device="cpu")
    assert "SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS" in daemon.log()
    path = write_dataset(make_dataset(seed=1, rows=96, columns=80), tmp_path / "a.dcm")
    assert daemon.storescu(str(path)).returncode == 0
    engine = daemon.engine()
    assert list(wait_until_processed(engine, 1).values()) == ["DONE"]
    with engine.connect() as conn:
        (row,) = conn.execute(select(PredictionRow)).all()
    assert row.model_name == "tiny-test-model" and row.synthetic_model
    assert list(row.probabilities) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in row.probabilities.values())

    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    daemon.cli("reprocess", uid)
    wait_until_processed(engine, 1)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(PredictionRow)) == 1
        (again,) = conn.execute(select(PredictionRow)).all()
    assert again.probabilities == row.probabilities, "same model, same image: same prediction"


def test_an_image_the_model_cannot_use_fails_with_a_reason(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(model_path=str(_artifact(tmp_path)), model_device="cpu")
    flat = write_dataset(make_dataset(pixel=np.full((96, 96), 700, np.uint16)), tmp_path / "flat.dcm")
    assert daemon.storescu(str(flat)).returncode == 0
    states = wait_until_processed(daemon.engine(), 1)
    assert list(states.values()) == ["FAILED"]
    assert "constant image" in daemon.cli("status", "--json").stdout


def test_a_missing_model_path_stops_the_daemon_with_a_clear_error(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(start=False, model_path=str(tmp_path / "nope.json"))
    result = daemon.cli("serve", check=False)
    assert result.returncode == 1 and "chexd model import" in result.stderr


def test_activation_and_rollback_reach_the_running_daemon(make_daemon, tmp_path: Path) -> None:
    from model.artifact import provenance_entry, read_manifest

    base = _artifact(tmp_path)
    daemon = make_daemon(model_path=str(base), model_device="cpu")
    engine = daemon.engine()

    def send_one(seed: int) -> str:
        path = write_dataset(make_dataset(seed=seed, rows=96, columns=80), tmp_path / f"{seed}.dcm")
        assert daemon.storescu(str(path)).returncode == 0
        wait_until_processed(engine, seed)
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        with engine.connect() as conn:
            return conn.execute(
                select(PredictionRow.model_version)
                .join(Instance, Instance.id == PredictionRow.instance_id)
                .where(Instance.sop_instance_uid == uid)
            ).scalar_one()

    v1 = read_manifest(base).version_id
    assert send_one(1) == v1
    other = save_artifact(
        tiny(seed=9),
        tmp_path / "other",
        name="tiny-test-model",
        preprocessing=PreprocessRecipe(input_size=64, resize=None),
        intended_use="synthetic demo model, not for diagnosis (test fixture)",
        synthetic=True,
        provenance=(provenance_entry("finetune", {}, parent_sha256=read_manifest(base).weights_sha256),),
    )
    v2 = read_manifest(other).version_id
    imported = json.loads(daemon.cli("model", "import", str(other), "--json").stdout)
    assert imported["registry"] == {"version": v2, "state": "candidate"}
    assert send_one(2) == v1, "a candidate is not used until activated"
    assert json.loads(daemon.cli("model", "activate", v2[:8], "--json").stdout) == {"active": v2, "previous": v1}
    time.sleep(1.5)  # the daemon checks the registry at most once a second, between jobs
    assert send_one(3) == v2, "the running daemon switched without a restart"
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert json.loads(daemon.cli("model", "rollback", "--json").stdout)["active"] == v1
    time.sleep(1.5)
    assert send_one(4) == v1
    assert "switched to model version" in daemon.log()
    listed = {v["version"]: v["state"] for v in json.loads(daemon.cli("model", "list", "--json").stdout)}
    assert listed == {v1: "active", v2: "retired"}
