"""The model registry: candidates, activation, rollback, lookup, and the admin-job log (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon.settings import Settings
from daemon.store.registry import (
    RegistryError,
    activate,
    active_model_path,
    admin_job,
    find_version,
    list_versions,
    register_baseline,
    register_candidate,
    registry_sessions,
    rollback,
)
from daemon.store.tables import AdminJob, AuditEvent, ModelVersion
from model.artifact import diff_artifacts, load_artifact, provenance_entry, read_manifest, save_artifact
from model.types import LABELS, PreprocessRecipe
from tests.nets import tiny

RECIPE = PreprocessRecipe(input_size=64, resize=None)
USE = "synthetic demo model, not for diagnosis (test fixture)"


def _save(
    folder: Path, *, seed: int = 3, thresholds: dict[str, float] | None = None, parent: str | None = None
) -> Path:
    return save_artifact(
        tiny(seed=seed),
        folder,
        name="tiny",
        preprocessing=RECIPE,
        intended_use=USE,
        synthetic=True,
        thresholds=thresholds,
        provenance=(provenance_entry("calibrate", {"objective": "f1"}, parent_sha256=parent),) if parent else (),
    )


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    base = _save(tmp_path / "base")
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, model_path=str(base))
    registry_sessions(settings)  # the database at head, as 'chexd db upgrade' or 'serve' leave it
    return settings


def _counts(settings: Settings) -> tuple[int, int]:
    with registry_sessions(settings)() as session:
        return (session.scalar(select(func.count()).select_from(ModelVersion)) or 0,
                session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_the_configured_model_becomes_the_active_baseline_when_the_daemon_starts(settings: Settings) -> None:
    assert list_versions(settings) == [] and _counts(settings) == (0, 0), "reading registers nothing"
    started = register_baseline(registry_sessions(settings), settings)
    (only,) = list_versions(settings)
    assert started is not None and started.version == only.version
    with registry_sessions(settings)() as session:
        events = session.scalars(select(AuditEvent.event).order_by(AuditEvent.id)).all()
    assert events == ["model_activated", "daemon_started"]
    register_baseline(registry_sessions(settings), settings)  # a second start: one more start event, no new row
    assert _counts(settings) == (1, 3)
    # read-only commands write nothing
    list_versions(settings), find_version(settings, "active"), active_model_path(settings)
    assert _counts(settings) == (1, 3)
    assert only.state == "active" and only.operation == "baseline"
    assert only.version == read_manifest(settings.model_path).version_id
    assert active_model_path(settings) == only.path and only.path.is_relative_to(settings.data_dir / "models")
    load_artifact(only.path)  # the registered copy is a complete, verified artifact


def test_a_threshold_change_is_a_new_candidate_that_activates_and_rolls_back(
    settings: Settings, tmp_path: Path
) -> None:
    base = read_manifest(settings.model_path)
    tuned = {label: 0.3 for label in LABELS}
    path = _save(tmp_path / "tuned", thresholds=tuned, parent=base.weights_sha256)
    candidate = register_candidate(settings, path, operation="calibrate", parameters={"objective": "f1"})
    assert candidate.state == "candidate" and candidate.version != base.version_id, "same weights, new version"
    assert candidate.parent_version == base.version_id, "the registered parent, not its weights hash"
    assert active_model_path(settings) != candidate.path, "registering never activates"
    assert register_candidate(settings, path, operation="calibrate").id == candidate.id, "idempotent"

    active, previous = activate(settings, candidate.version[:6])
    assert active.version == candidate.version and previous == base.version_id
    assert active_model_path(settings) == candidate.path
    states = {v.version: v.state for v in list_versions(settings)}
    assert states == {base.version_id: "retired", candidate.version: "active"}

    back, was = rollback(settings)
    assert back.version == base.version_id and was == candidate.version
    assert read_manifest(active_model_path(settings)).thresholds[LABELS[0]] == 0.5
    with registry_sessions(settings)() as session:
        events = session.scalars(select(AuditEvent.detail).where(AuditEvent.event == "model_activated")).all()
    assert len(events) == 3 and "rollback" in events[-1], "baseline, activate and rollback are audited"
    diff = diff_artifacts(base_path := find_version(settings, base.version_id).path, candidate.path)
    assert base_path.is_file() and set(diff["thresholds"]) == set(LABELS) and not diff["classifier_changes"]
    assert diff["backbone_changed"] is False


def test_lookup_errors_name_the_problem(settings: Settings) -> None:
    with pytest.raises(RegistryError, match="no model version 'abcdef'"):
        find_version(settings, "abcdef")
    with pytest.raises(RegistryError, match="too short"):
        find_version(settings, "ab")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        rollback(settings)


def test_a_broken_candidate_is_refused_and_the_active_model_stays(settings: Settings, tmp_path: Path) -> None:
    path = _save(tmp_path / "other", seed=5)
    candidate = register_candidate(settings, path, operation="finetune")
    weights = candidate.path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    before = active_model_path(settings)
    with pytest.raises(RegistryError, match="cannot activate"):
        activate(settings, candidate.version)
    assert active_model_path(settings) == before


def test_register_refuses_weights_that_do_not_match_the_manifest(settings: Settings, tmp_path: Path) -> None:
    path = _save(tmp_path / "bad", seed=7)
    weights = path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\1\2\3\4")
    with pytest.raises(RegistryError, match="does not match the manifest"):
        register_candidate(settings, path, operation="import")


def test_admin_jobs_record_result_duration_and_failure(settings: Settings) -> None:
    with admin_job(settings, "calibrate", {"objective": "youden"}) as job:
        job.result = {"f1_ratio": 1.3}
    with pytest.raises(ValueError, match="boom"), admin_job(settings, "correct", {"finding": "Mass"}):
        raise ValueError("boom")
    with registry_sessions(settings)() as session:
        rows = session.scalars(select(AdminJob).order_by(AdminJob.id)).all()
    assert [(r.kind, r.state) for r in rows] == [("calibrate", "done"), ("correct", "failed")]
    assert rows[0].result == {"f1_ratio": 1.3} and rows[0].duration_s is not None and rows[0].user
    assert "boom" in rows[1].error and rows[1].parameters == {"finding": "Mass"}


def test_reading_a_database_nothing_started_on_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "chexd.sqlite"
    db.parent.mkdir()
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{db}", model_path=str(_save(tmp_path)))
    with pytest.raises(RegistryError, match="start 'chexd serve'"):
        list_versions(settings)
    assert not db.exists() or db.stat().st_size == 0


def test_a_start_with_a_broken_configured_model_is_refused_and_records_nothing(settings: Settings) -> None:
    weights = Path(settings.model_path).with_suffix(".safetensors")
    if not weights.is_file():  # model_path names the folder
        (weights,) = Path(settings.model_path).glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RegistryError, match="does not match the manifest's sha256"):
        register_baseline(registry_sessions(settings), settings)
    assert _counts(settings) == (0, 0)
