"""The worker runs the configured model: a C-STORE ends as a stored prediction (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import func, select

from daemon.tables import PredictionRow
from model.artifact import save_artifact
from model.types import LABELS, PreprocessRecipe
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.peers import wait_until_processed
from tests.unit.test_network import tiny


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
