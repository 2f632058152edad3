"""daemon.work.worker on SQLite and a real PostgreSQL server: claiming under a lease, retries, lease recovery."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import record_instance
from daemon.store.nodes import pid_alive
from daemon.store.spool import Spool, SpooledFile
from daemon.store.tables import Instance, Job, JobState, utcnow
from daemon.work.worker import HOST, PermanentJobError, Worker, requeue_expired, worker_identity
from model.errors import ImageTooLargeError
from tests.storegen import (
    ROOT,
    make_meta,
    rel_of,
)

DEAD_PID = 999999  # above Linux's largest pid_max default (4194304 is the hard limit; we check below)


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]
    settings: Settings
    spool: Spool

    def worker(self, processor: Any, index: int = 0, identity: str | None = None) -> Worker:
        return Worker(
            self.sessions, self.spool, self.settings, identity=identity or worker_identity(index), processor=processor
        )

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def instance_of(self, job_id: int) -> Instance:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            instance = session.get(Instance, job.instance_id)
            assert instance is not None
            return instance


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    settings = Settings(
        data_dir=tmp_path / "data", database_url=head_db_url, job_max_attempts=2, job_lease_seconds=60,
        disk_reserve_mb=0,
    )
    yield Env(engine, session_factory(engine), settings, Spool(settings.spool_dir, settings.quarantine_dir))
    engine.dispose()


def add_job(env: Env, n: int, *, skip_reason: str | None = None) -> int:
    """Record instance ``n`` (no file needed: the processors here never open it); return its job id."""
    meta = make_meta(n, skip_reason=skip_reason)
    rel = rel_of(meta)
    spooled = SpooledFile(relative_path=rel, absolute_path=env.spool.root / rel, size_bytes=128)
    with env.sessions.begin() as session:
        instance_id = record_instance(session, meta, spooled, calling_ae="MODALITY", fingerprint="none")
        return session.scalar(select(Job.id).where(Job.instance_id == instance_id))


def stats_processor(path: Path) -> dict[str, Any]:
    return {"rows": 8, "columns": 8, "mean": 0.25, "file": path.name}


def test_claim_marks_job_running_with_a_lease_and_first_attempt(env: Env) -> None:
    job_id = add_job(env, 1)
    before = utcnow()
    claimed = env.worker(stats_processor).claim()
    after = utcnow()
    assert claimed is not None
    assert claimed.job_id == job_id
    assert claimed.attempts == 1
    assert claimed.sop_instance_uid == f"{ROOT}.1.1.1"
    assert claimed.path.endswith(f"{ROOT}.1.1.1.dcm")
    job = env.job(job_id)
    assert job.state is JobState.RUNNING
    assert job.attempts == 1
    assert job.leased_by == worker_identity(0)
    assert job.lease_expires_at is not None
    lease = timedelta(seconds=env.settings.job_lease_seconds)
    assert before + lease - timedelta(seconds=1) <= job.lease_expires_at <= after + lease + timedelta(seconds=1)


def test_claim_returns_none_on_an_empty_queue(env: Env) -> None:
    assert env.worker(stats_processor).claim() is None
    assert env.worker(stats_processor).run_one() is False


def test_claim_ignores_skipped_jobs(env: Env) -> None:
    add_job(env, 1, skip_reason="not a frontal view: ViewPosition=LL")
    assert env.worker(stats_processor).claim() is None


def test_claim_takes_jobs_in_arrival_order(env: Env) -> None:
    ids = [add_job(env, n) for n in range(1, 4)]
    worker = env.worker(stats_processor)
    claimed = [worker.claim() for _ in ids]
    assert [c.job_id for c in claimed if c] == ids


def test_concurrent_workers_never_claim_the_same_job(env: Env) -> None:
    job_ids = [add_job(env, n) for n in range(1, 21)]
    workers = [env.worker(stats_processor, index=i) for i in range(4)]
    claimed: dict[str, list[int]] = {w.identity: [] for w in workers}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def loop(worker: Worker) -> None:
        try:
            barrier.wait()
            while (job := worker.claim()) is not None:
                claimed[worker.identity].append(job.job_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    everything = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(everything) == job_ids  # each job exactly once
    with env.sessions() as session:
        rows = session.execute(select(Job.id, Job.leased_by, Job.state, Job.attempts)).all()
    owner = {job_id: identity for identity, ids in claimed.items() for job_id in ids}
    for job_id, leased_by, state, attempts in rows:
        assert (state, attempts, leased_by) == (JobState.RUNNING, 1, owner[job_id])


def test_done_job_stores_processor_result_in_image_stats(env: Env) -> None:
    job_id = add_job(env, 1)
    seen: list[Path] = []

    def processor(path: Path) -> dict[str, Any]:
        seen.append(path)
        return stats_processor(path)

    assert env.worker(processor).run_one() is True
    assert seen == [env.spool.root / f"{ROOT}.1/{ROOT}.1.1/{ROOT}.1.1.1.dcm"]
    job = env.job(job_id)
    assert job.state is JobState.DONE
    assert job.error is None
    assert job.finished_at is not None
    assert job.lease_expires_at is None
    assert env.instance_of(job_id).image_stats == {"rows": 8, "columns": 8, "mean": 0.25, "file": f"{ROOT}.1.1.1.dcm"}


def test_permanent_error_fails_at_once_with_its_message(env: Env) -> None:
    job_id = add_job(env, 1)

    def processor(path: Path) -> dict[str, Any]:
        raise PermanentJobError("pixel data cannot be decoded: truncated JPEG stream")

    env.worker(processor).run_one()
    job = env.job(job_id)
    assert job.state is JobState.FAILED
    assert job.attempts == 1
    assert job.error == "pixel data cannot be decoded: truncated JPEG stream"
    assert job.finished_at is not None
    assert env.instance_of(job_id).image_stats is None


def test_image_decode_error_fails_once_with_one_warning_and_no_traceback(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = add_job(env, 1)

    def processor(path: Path) -> dict[str, Any]:
        raise ImageTooLargeError("image too large: 60000 x 60000 - the limit is 100,000,000 (max_image_pixels)")

    with caplog.at_level("INFO", logger="daemon.work.worker"):
        env.worker(processor).run_one()
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.error is not None and job.error.startswith("image too large")
    records = [r for r in caplog.records if r.name == "daemon.work.worker"]
    assert [r.levelname for r in records] == ["WARNING"]
    assert f"sop_instance_uid={ROOT}.1.1.1" in records[0].getMessage() and records[0].exc_info is None


def test_transient_error_retries_later_then_fails_after_max_attempts(env: Env) -> None:
    job_id = add_job(env, 1)
    calls: list[Path] = []

    def processor(path: Path) -> dict[str, Any]:
        calls.append(path)
        raise RuntimeError("database of thresholds is busy")

    worker = env.worker(processor)
    before = utcnow()
    assert worker.run_one() is True
    job = env.job(job_id)
    assert job.state is JobState.QUEUED
    assert job.attempts == 1
    assert job.leased_by is None and job.lease_expires_at is None
    assert job.available_at > before
    assert job.error == "RuntimeError: database of thresholds is busy"
    assert worker.claim() is None  # backing off: not available yet

    with env.sessions.begin() as session:  # let the back-off elapse
        session.execute(update(Job).where(Job.id == job_id).values(available_at=utcnow() - timedelta(seconds=1)))
    assert worker.run_one() is True
    job = env.job(job_id)
    assert job.state is JobState.FAILED  # job_max_attempts=2
    assert job.attempts == 2
    assert job.error is not None and "RuntimeError: database of thresholds is busy" in job.error
    assert "attempt 2" in job.error
    assert len(calls) == 2
    assert worker.run_one() is False


def test_finish_after_losing_the_lease_changes_nothing(env: Env) -> None:
    job_id = add_job(env, 1)

    def processor(path: Path) -> dict[str, Any]:
        # meanwhile lease recovery hands the job back to the queue (another worker may take it)
        with env.sessions.begin() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(state=JobState.QUEUED, leased_by=None, lease_expires_at=None)
            )
        return stats_processor(path)

    env.worker(processor).run_one()
    job = env.job(job_id)
    assert job.state is JobState.QUEUED
    assert job.finished_at is None
    assert env.instance_of(job_id).image_stats is None


def set_lease(env: Env, job_id: int, leased_by: str, expires_in: timedelta) -> None:
    with env.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.RUNNING, attempts=1, leased_by=leased_by, lease_expires_at=utcnow() + expires_in)
        )


def test_requeue_expired_returns_an_expired_lease_to_the_queue(env: Env) -> None:
    job_id = add_job(env, 1)
    set_lease(env, job_id, "other-host/1234/0", timedelta(seconds=-5))
    assert requeue_expired(env.sessions) == 1
    job = env.job(job_id)
    assert job.state is JobState.QUEUED
    assert job.leased_by is None and job.lease_expires_at is None
    assert job.attempts == 1  # the attempt is still counted
    assert env.worker(stats_processor).claim() is not None


def test_requeue_at_startup_takes_back_a_lease_of_a_dead_process_on_this_host(env: Env) -> None:
    assert not pid_alive(DEAD_PID)
    job_id = add_job(env, 1)
    set_lease(env, job_id, f"{socket.gethostname()}/{DEAD_PID}/0", timedelta(seconds=300))
    assert requeue_expired(env.sessions) == 0  # periodic recovery trusts an unexpired lease
    assert env.job(job_id).state is JobState.RUNNING
    assert requeue_expired(env.sessions, at_startup=True) == 1
    assert env.job(job_id).state is JobState.QUEUED


def test_requeue_at_startup_leaves_a_live_lease_of_another_host(env: Env) -> None:
    job_id = add_job(env, 1)
    set_lease(env, job_id, f"not-{socket.gethostname()}/{DEAD_PID}/0", timedelta(seconds=300))
    assert requeue_expired(env.sessions, at_startup=True) == 0
    job = env.job(job_id)
    assert job.state is JobState.RUNNING
    assert job.leased_by == f"not-{socket.gethostname()}/{DEAD_PID}/0"


def test_requeue_at_startup_leaves_a_lease_of_a_live_process_on_this_host(env: Env) -> None:
    job_id = add_job(env, 1)
    # a live process other than this one (a lease under this process's own pid is a reused pid's at start-up)
    set_lease(env, job_id, f"{HOST}/{os.getppid()}/0", timedelta(seconds=300))
    assert requeue_expired(env.sessions, at_startup=True) == 0
    assert env.job(job_id).state is JobState.RUNNING


def test_requeue_at_startup_takes_back_a_lease_under_this_process_pid(env: Env) -> None:
    """At start-up nothing is claimed yet: a lease under this pid is an earlier process's (a reused pid)."""
    job_id = add_job(env, 1)
    set_lease(env, job_id, worker_identity(0), timedelta(seconds=300))
    assert requeue_expired(env.sessions, at_startup=True) == 1
    assert env.job(job_id).state is JobState.QUEUED


def test_requeue_leaves_finished_jobs_alone(env: Env) -> None:
    job_id = add_job(env, 1)
    env.worker(stats_processor).run_one()
    assert requeue_expired(env.sessions, at_startup=True) == 0
    assert env.job(job_id).state is JobState.DONE
    with env.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_expired_lease_on_the_final_attempt_fails_the_job_instead_of_running_it_again(env: Env) -> None:
    """A job whose worker died during its last allowed attempt (e.g. killed decoding a poison image) must end FAILED;
    re-queueing it without limit crash-loops the daemon on the same image."""
    job_id = add_job(env, 1)
    set_lease(env, job_id, "other-host/1234/0", timedelta(seconds=-5))
    with env.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempts=env.settings.job_max_attempts))
    requeue_expired(env.sessions)
    calls: list[Path] = []

    def processor(path: Path) -> dict[str, Any]:
        calls.append(path)
        return stats_processor(path)

    env.worker(processor).run_one()
    job = env.job(job_id)
    assert calls == []
    assert job.state is JobState.FAILED
    assert job.attempts == env.settings.job_max_attempts
    assert job.error


@pytest.mark.parametrize("score", [41.2, float("inf")])
def test_the_applicability_verdict_is_stored_with_the_prediction_and_counted(env: Env, score: float) -> None:
    from daemon.store.queries import applicability_counts
    from daemon.store.tables import PredictionRow
    from daemon.work.worker import JobResult
    from model.types import Applicability, QualityIssue
    from reporting.report import domain_check
    from tests.reporting_helpers import make_prediction

    verdicts = {
        1: domain_check(Applicability(score=score, threshold=18.7, in_domain=False, method="m"),
                        (QualityIssue(code="inverted", reason="looks inverted"),), "withhold"),
        2: domain_check(Applicability(score=3.0, threshold=18.7, in_domain=True, method="m"), (), "flag"),
        3: None,  # the gate was off
    }
    jobs = {}
    for n, domain in verdicts.items():
        jobs[n] = add_job(env, n)
        result = JobResult(image_stats={}, prediction=make_prediction({"Effusion": 0.9}), model_name="m", domain=domain)
        assert env.worker(lambda path, result=result: result).run_one()
    with env.sessions() as session:
        rows = {r.instance_id: r for r in session.scalars(select(PredictionRow))}
        withheld, inside, off = (rows[env.instance_of(jobs[n]).id] for n in (1, 2, 3))
        assert (withheld.applicability_status, withheld.applicability_score) == ("withheld", score)
        assert withheld.applicability_threshold == 18.7
        assert withheld.quality_issues == [{"code": "inverted", "reason": "looks inverted"}]
        assert (inside.applicability_status, inside.quality_issues) == ("in_domain", [])
        assert (off.applicability_status, off.applicability_score, off.quality_issues) == (None, None, None)
        counts = applicability_counts(session)
    assert {k: v for k, v in counts.items() if v} == {"withheld": 1, "in_domain": 1, "off": 1}


def test_input_quality_passes_a_phantom_and_names_what_is_wrong_with_an_inverted_or_tiny_one() -> None:
    from daemon.work.inference import input_quality
    from model.phantom import generate, to_dicom
    from model.preprocess import decode_image

    image = decode_image(to_dicom(generate(0, 1, size=256)))
    assert input_quality(image, "MONOCHROME2") == ()
    codes = {issue.code for issue in input_quality(1.0 - image, "MONOCHROME2")}
    assert "inverted" in codes or "lungs_not_found" in codes, codes
    assert "too_few_pixels" in {issue.code for issue in input_quality(image[::2, ::2], "MONOCHROME2")}
    assert [i.code for i in input_quality(image, "PALETTE COLOR")] == []  # an unknown one is judged as unlabelled
