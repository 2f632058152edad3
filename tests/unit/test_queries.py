"""daemon.store.queries: the CLI's read-side views and reprocess (SQLite and real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.intake import InstanceMeta
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import record_instance
from daemon.store.queries import NotFoundError, list_studies, queue_summary, reprocess, show
from daemon.store.spool import SpooledFile
from daemon.store.tables import AuditEvent, Instance, Job, JobState, utcnow

ROOT = "1.2.826.0.1.3680043.10.9999"
STUDY_A, STUDY_B = f"{ROOT}.1", f"{ROOT}.2"
LATERAL = "not a frontal view: ViewPosition=LL"


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]

    def add(
        self,
        study: str,
        series: int,
        n: int,
        *,
        state: JobState = JobState.QUEUED,
        error: str | None = None,
        attempts: int = 0,
        skip_reason: str | None = None,
        received_at: datetime | None = None,
    ) -> str:
        """Record one instance with its job in ``state``; return its SOP Instance UID."""
        meta = InstanceMeta(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            sop_instance_uid=f"{study}.{series}.{n}",
            study_instance_uid=study,
            series_instance_uid=f"{study}.{series}",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="DX",
            body_part="CHEST",
            view_position="LL" if skip_reason else "PA",
            study_date="20240303",
            skip_reason=skip_reason,
        )
        rel = f"{meta.study_instance_uid}/{meta.series_instance_uid}/{meta.sop_instance_uid}.dcm"
        with self.sessions.begin() as session:
            instance_id = record_instance(
                session,
                meta,
                SpooledFile(relative_path=rel, absolute_path=Path("/") / rel, size_bytes=64),
                "CR1",
                fingerprint="none",
            )
            session.flush()
            if received_at is not None:
                session.execute(update(Instance).where(Instance.id == instance_id).values(received_at=received_at))
            if not skip_reason:
                session.execute(
                    update(Job)
                    .where(Job.instance_id == instance_id)
                    .values(
                        state=state,
                        error=error,
                        attempts=attempts,
                        finished_at=utcnow() if state in (JobState.DONE, JobState.FAILED) else None,
                    )
                )
        return meta.sop_instance_uid

    def job_of(self, sop_instance_uid: str) -> Job:
        with self.sessions() as session:
            return session.scalars(
                select(Job)
                .join(Instance, Job.instance_id == Instance.id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).one()


@pytest.fixture
def env(head_db_url: str) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    yield Env(engine, session_factory(engine))
    engine.dispose()


@pytest.fixture
def populated(env: Env) -> dict[str, str]:
    """Study A: series 1 (done, failed, skipped), series 2 (queued retry); study B: one done instance, older."""
    earlier = utcnow() - timedelta(hours=2)
    return {
        "done": env.add(STUDY_A, 1, 1, state=JobState.DONE, attempts=1),
        "failed": env.add(
            STUDY_A, 1, 2, state=JobState.FAILED, attempts=2, error="pixel data cannot be decoded: bad JPEG"
        ),
        "skipped": env.add(STUDY_A, 1, 3, skip_reason=LATERAL),
        "retrying": env.add(STUDY_A, 2, 1, state=JobState.QUEUED, attempts=1, error="RuntimeError: busy"),
        "other": env.add(STUDY_B, 1, 1, state=JobState.DONE, attempts=1, received_at=earlier),
    }


def test_queue_summary_on_an_empty_database(env: Env) -> None:
    summary = queue_summary(env.sessions)
    assert summary["jobs"] == {s.value: 0 for s in JobState}
    assert (summary["instances"], summary["studies"], summary["last_errors"]) == (0, 0, [])


def test_queue_summary_counts_jobs_by_state_and_lists_failures(env: Env, populated: dict[str, str]) -> None:
    summary = queue_summary(env.sessions)
    assert summary["jobs"] == {"QUEUED": 1, "RUNNING": 0, "DONE": 2, "FAILED": 1, "SKIPPED": 1}
    assert (summary["instances"], summary["studies"]) == (5, 2)
    errors = {e["sop_instance_uid"]: e for e in summary["last_errors"]}
    assert set(errors) == {populated["failed"], populated["retrying"]}
    failed = errors[populated["failed"]]
    assert (failed["state"], failed["attempts"], failed["error"]) == (
        "FAILED",
        2,
        "pixel data cannot be decoded: bad JPEG",
    )
    assert failed["at"] is not None
    assert errors[populated["retrying"]]["state"] == "QUEUED"


def test_queue_summary_limits_the_error_list(env: Env, populated: dict[str, str]) -> None:
    assert len(queue_summary(env.sessions, last_errors=1)["last_errors"]) == 1


def test_list_studies_most_recent_first_with_counts(env: Env, populated: dict[str, str]) -> None:
    studies = list_studies(env.sessions)
    assert [s["study_instance_uid"] for s in studies] == [STUDY_A, STUDY_B]
    a, b = studies
    assert (a["series"], a["instances"], a["study_date"]) == (2, 4, "20240303")
    assert a["jobs"] == {"DONE": 1, "FAILED": 1, "SKIPPED": 1, "QUEUED": 1}
    assert (b["series"], b["instances"], b["jobs"]) == (1, 1, {"DONE": 1})
    assert a["last_received"] is not None and b["last_received"] < a["last_received"]


def test_list_studies_respects_the_limit(env: Env, populated: dict[str, str]) -> None:
    assert [s["study_instance_uid"] for s in list_studies(env.sessions, limit=1)] == [STUDY_A]


def test_show_by_study_uid_lists_every_instance(env: Env, populated: dict[str, str]) -> None:
    view = show(env.sessions, STUDY_A)
    assert (view["uid"], view["level"]) == (STUDY_A, "study")
    assert {i["sop_instance_uid"] for i in view["instances"]} == {
        populated["done"],
        populated["failed"],
        populated["skipped"],
        populated["retrying"],
    }


def test_show_by_series_uid(env: Env, populated: dict[str, str]) -> None:
    view = show(env.sessions, f"{STUDY_A}.2")
    assert view["level"] == "series"
    assert [i["sop_instance_uid"] for i in view["instances"]] == [populated["retrying"]]


def test_show_by_instance_uid_has_metadata_and_job(env: Env, populated: dict[str, str]) -> None:
    view = show(env.sessions, populated["failed"])
    assert view["level"] == "instance"
    (instance,) = view["instances"]
    assert instance["study_instance_uid"] == STUDY_A
    assert instance["series_instance_uid"] == f"{STUDY_A}.1"
    assert (instance["modality"], instance["calling_ae"], instance["size_bytes"]) == ("DX", "CR1", 64)
    assert instance["job"]["state"] == "FAILED"
    assert instance["job"]["attempts"] == 2
    assert instance["job"]["error"] == "pixel data cannot be decoded: bad JPEG"
    assert instance["job"]["finished_at"] is not None
    skipped = show(env.sessions, populated["skipped"])["instances"][0]
    assert (skipped["skip_reason"], skipped["job"]["state"]) == (LATERAL, "SKIPPED")


def test_show_unknown_uid_raises_not_found(env: Env, populated: dict[str, str]) -> None:
    with pytest.raises(NotFoundError, match=f"{ROOT}.404"):
        show(env.sessions, f"{ROOT}.404")


def test_reprocess_unknown_uid_raises_not_found(env: Env) -> None:
    with pytest.raises(NotFoundError):
        reprocess(env.sessions, f"{ROOT}.404")


def test_reprocess_requeues_a_failed_job_with_attempts_reset(env: Env, populated: dict[str, str]) -> None:
    assert reprocess(env.sessions, populated["failed"]) == {"requeued": 1, "skipped": 0, "conflicts": 0}
    job = env.job_of(populated["failed"])
    assert (job.state, job.attempts, job.error, job.finished_at) == (JobState.QUEUED, 0, None, None)
    assert job.available_at <= utcnow()
    with env.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.event == "reprocess_requested")).one()
        assert event.sop_instance_uid == populated["failed"]


def test_reprocess_of_a_study_leaves_skipped_instances_skipped(env: Env, populated: dict[str, str]) -> None:
    result = reprocess(env.sessions, STUDY_A)
    assert result == {"requeued": 3, "skipped": 1, "conflicts": 0}
    assert env.job_of(populated["skipped"]).state is JobState.SKIPPED
    assert env.job_of(populated["skipped"]).error == LATERAL
    for key in ("done", "failed", "retrying"):
        assert env.job_of(populated[key]).state is JobState.QUEUED
    other = env.job_of(populated["other"])
    assert (other.state, other.attempts) == (JobState.DONE, 1)  # another study is untouched


def test_reprocess_leaves_a_running_job_alone(env: Env) -> None:
    uid = env.add(STUDY_A, 1, 1, state=JobState.RUNNING, attempts=1)
    assert reprocess(env.sessions, uid) == {"requeued": 0, "skipped": 0, "conflicts": 0}
    assert env.job_of(uid).state is JobState.RUNNING
