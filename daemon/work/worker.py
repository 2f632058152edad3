"""The job worker: claims queued jobs under a lease and runs the processing step on the stored file.

Claiming is one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`` statement, so several workers
(threads or daemons on one PostgreSQL) never run the same job; on SQLite the row lock clause is dropped and the
single statement is serialised by SQLite itself. A job whose worker died is re-queued when its lease expires, or at
start-up when the lease holder was a process of this host that no longer exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DaemonError
from daemon.settings import Settings
from daemon.store.nodes import HOST, pid_alive
from daemon.store.spool import DiskPause, Spool, is_disk_full
from daemon.store.tables import Instance, Job, JobState, PredictionRow, utcnow
from daemon.work.loop import Loop
from model.errors import ImageDecodeError
from model.manifest import Manifest
from model.preprocess import DEFAULT_LIMITS, PixelLimits, decode_image, read_dicom, stats_of
from model.types import Prediction
from reporting.regions import LungFields
from reporting.report import DomainCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobResult:
    """What processing one instance produced: image statistics and, when a model ran, its prediction and the
    applicability gate's verdict on it (``domain``: a reporting.report.DomainCheck, None when the gate is off)."""

    image_stats: dict[str, Any]
    prediction: Prediction | None = None
    model_name: str | None = None
    synthetic_model: bool = False
    manifest: Manifest | None = None  # the model that made the prediction
    domain: DomainCheck | None = None  # the applicability gate's verdict
    lung_fields: LungFields | None = None  # estimated for the input checks; the report reuses them


class ResultSink(Protocol):
    """Receives every job result with a prediction (the report scheduler): ``save`` runs before the job's commit
    (files), ``record`` inside the same transaction that marks the job DONE (rows)."""

    def save(self, job: ClaimedJob, result: JobResult) -> None: ...

    def record(self, session: Session, job: ClaimedJob, result: JobResult) -> None: ...


Processor = Callable[[Path], "JobResult | dict[str, Any]"]


class PermanentJobError(DaemonError):
    """Retrying cannot help (the input itself is unusable); the job fails at once with this message."""


def read_stored_image(path: Path, limits: PixelLimits = DEFAULT_LIMITS) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read a spooled file and decode its pixels to float [rows, columns] in [0, 1] (bright = dense), refusing
    images over ``limits`` (header and codestream are checked before decoding; deflate is inflated with a cap).

    Raises PermanentJobError when the file is missing, cannot be parsed, or its pixel data is over a limit or
    cannot be decoded (retrying cannot help); OSError and MemoryError pass through (transient: the job retries)."""
    try:
        ds = read_dicom(path, limits)
    except FileNotFoundError:
        raise PermanentJobError(f"stored file is missing from the spool: {path.name}") from None
    except (OSError, MemoryError):
        raise
    except ImageDecodeError as exc:
        raise PermanentJobError(f"stored file cannot be read: {exc}") from exc
    except Exception as exc:  # pydicom's parse errors (ValueError, KeyError, RecursionError ...) are the input's
        raise PermanentJobError(f"stored file cannot be read: {type(exc).__name__}: {exc}") from exc
    try:
        return ds, decode_image(ds, limits=limits)
    except ImageDecodeError as exc:
        raise PermanentJobError(f"pixel data cannot be decoded: {exc}") from exc


def decode_statistics(path: Path, limits: PixelLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The processing step without a model: decode the stored image (under ``limits``) and return its statistics
    (normalised units).

    Raises PermanentJobError when the file or its pixel data cannot be decoded or is over a limit."""
    ds, image = read_stored_image(path, limits)
    return stats_of(ds, image).to_dict()


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimedJob:
    job_id: int
    attempts: int
    instance_id: int
    sop_instance_uid: str
    path: str


def store_prediction(session: Session, instance_id: int, result: JobResult) -> None:
    """Insert or replace the prediction of (instance, model version): reprocessing never duplicates. With the
    applicability gate's verdict (``result.domain``) its status, score, threshold and quality issues are stored
    too (all NULL when the gate was off)."""
    prediction = result.prediction
    if prediction is None:
        raise ValueError("store_prediction needs a result with a prediction")
    domain = result.domain
    values = {
        "model_name": result.model_name or "unnamed",
        "synthetic_model": result.synthetic_model,
        "probabilities": prediction.as_dict(),
        "logits": {label: float(v) for label, v in zip(prediction.labels, prediction.logits, strict=True)},
        "applicability_status": None if domain is None else domain.status,
        "applicability_score": None if domain is None else domain.score,
        "applicability_threshold": None if domain is None else domain.threshold,
        "quality_issues": None if domain is None else [issue.to_dict() for issue in domain.quality],
        "created_at": utcnow(),
    }
    row = session.scalar(
        select(PredictionRow).where(
            PredictionRow.instance_id == instance_id, PredictionRow.model_version == prediction.model_version
        )
    )
    if row is None:
        session.add(PredictionRow(instance_id=instance_id, model_version=prediction.model_version, **values))
    else:
        for key, value in values.items():
            setattr(row, key, value)


def worker_identity(index: int) -> str:
    return f"{HOST}/{os.getpid()}/{index}"



def holder_gone(holder: str | None) -> bool:
    """At start-up: whether a lease holder ``host/pid[/…]`` was a process of this host that is gone. A holder with
    this process's own pid is gone too: nothing was claimed yet, so it was an earlier process whose pid is reused
    (common in containers, where the daemon always gets the same small pid)."""
    host, _, rest = (holder or "").partition("/")
    pid = rest.partition("/")[0]
    return host == HOST and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid)))


def requeue_expired(sessions: sessionmaker[Session], *, at_startup: bool = False) -> int:
    """Return RUNNING jobs whose lease expired (or, at start-up, whose holder on this host is dead) to QUEUED."""
    now = utcnow()
    with sessions.begin() as session:
        rows = session.execute(
            select(Job.id, Job.leased_by, Job.lease_expires_at).where(Job.state == JobState.RUNNING)
        ).all()
        stale = []
        for job_id, leased_by, expires in rows:
            if expires is None or expires < now or (at_startup and holder_gone(leased_by)):
                stale.append(job_id)
        if stale:
            session.execute(
                update(Job)
                .where(Job.id.in_(stale), Job.state == JobState.RUNNING)
                .values(state=JobState.QUEUED, leased_by=None, lease_expires_at=None, available_at=now)
            )
    if stale:
        log.warning("re-queued %d job(s) with expired leases", len(stale))
    return len(stale)


def fail_exhausted(sessions: sessionmaker[Session], max_attempts: int) -> int:
    """Fail queued jobs that already used every attempt: their worker was lost mid-job (a crash or kill, perhaps
    caused by the image itself), so running them again could crash-loop the daemon."""
    now = utcnow()
    with sessions.begin() as session:
        count = session.execute(
            update(Job)
            .where(Job.state == JobState.QUEUED, Job.attempts >= max_attempts)
            .values(
                state=JobState.FAILED,
                error=f"worker lost during the final attempt (of {max_attempts}); not retried - "
                "check the log, then 'chexd reprocess UID'",
                finished_at=now,
                updated_at=now,
            )
        ).rowcount
    if count:
        log.warning("failed %d job(s) whose worker was lost on their final attempt", count)
    return count


class Worker:
    """Runs jobs one at a time in the calling thread; run several for parallelism."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        settings: Settings,
        *,
        identity: str,
        processor: Processor = decode_statistics,
        sink: ResultSink | None = None,
        disk: DiskPause | None = None,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.settings = settings
        self.identity = identity
        self.processor = processor
        self.sink = sink
        self.disk = disk or DiskPause(spool.guard, settings.data_dir, "jobs")

    def claim(self) -> ClaimedJob | None:
        now = utcnow()
        candidate = (
            select(Job.id)
            .where(
                Job.state == JobState.QUEUED,
                Job.available_at <= now,
                Job.attempts < self.settings.job_max_attempts,
            )
            .order_by(Job.available_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.sessions.begin() as session:
            row = session.execute(
                update(Job)
                .where(Job.id == candidate, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    leased_by=self.identity,
                    lease_expires_at=now + timedelta(seconds=self.settings.job_lease_seconds),
                    updated_at=now,
                )
                .returning(Job.id, Job.attempts, Job.instance_id)
            ).first()
            if row is None:
                return None
            instance = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.id == row.instance_id)
            ).one()
        return ClaimedJob(
            job_id=row.id,
            attempts=row.attempts,
            instance_id=row.instance_id,
            sop_instance_uid=instance.sop_instance_uid,
            path=instance.path,
        )

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue had nothing ready, or the disk is below the reserve (jobs
        wait: a job whose result cannot be written for want of space goes back to the queue, its attempt not
        counted)."""
        if self.disk.blocked():
            return False
        job = self.claim()
        if job is None:
            fail_exhausted(self.sessions, self.settings.job_max_attempts)
            return False
        try:
            result = self.processor(self.spool.path_of(job.path))
        except (PermanentJobError, ImageDecodeError) as exc:  # the input's fault: fail once, one WARNING, no retry
            self._finish(job, JobState.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("job failed job_id=%s sop_instance_uid=%s", job.job_id, job.sop_instance_uid)
            if job.attempts >= self.settings.job_max_attempts:
                self._finish(job, JobState.FAILED, error=f"{type(exc).__name__}: {exc} (attempt {job.attempts})")
            else:
                self._retry(job, f"{type(exc).__name__}: {exc}")
        else:
            try:
                self._finish(job, JobState.DONE, result=result)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self._release(job)
                self.disk.hit(exc)
        return True

    def _release(self, job: ClaimedJob) -> None:
        """Give a claimed job back untouched (its attempt not counted): it waits for disk space, not for a retry."""
        now = utcnow()
        try:
            with self.sessions.begin() as session:
                session.execute(
                    update(Job)
                    .where(self._owned(job))
                    .values(
                        state=JobState.QUEUED,
                        attempts=Job.attempts - 1,
                        leased_by=None,
                        lease_expires_at=None,
                        available_at=now,
                        updated_at=now,
                    )
                )
        except Exception as exc:  # the database is on the full disk: the lease runs out, or start-up re-queues it
            if not is_disk_full(exc):
                raise

    def _owned(self, job: ClaimedJob) -> Any:
        return and_(Job.id == job.job_id, Job.state == JobState.RUNNING, Job.leased_by == self.identity)

    def _finish(
        self, job: ClaimedJob, state: JobState, *, error: str | None = None, result: JobResult | dict | None = None
    ) -> None:
        if isinstance(result, dict):
            result = JobResult(image_stats=result)
        if result is not None and result.prediction is not None and self.sink is not None:
            self.sink.save(job, result)
        now = utcnow()
        with self.sessions.begin() as session:
            updated = session.execute(
                update(Job)
                .where(self._owned(job))
                .values(state=state, error=error, finished_at=now, lease_expires_at=None, updated_at=now)
            ).rowcount
            if updated and result is not None:
                session.execute(
                    update(Instance).where(Instance.id == job.instance_id).values(image_stats=result.image_stats)
                )
                if result.prediction is not None:
                    store_prediction(session, job.instance_id, result)
                    if self.sink is not None:
                        self.sink.record(session, job, result)
        if not updated:
            log.warning("lost lease before finishing job_id=%s", job.job_id)
        elif state is JobState.FAILED:
            log.warning("job failed job_id=%s sop_instance_uid=%s: %s", job.job_id, job.sop_instance_uid, error)
        else:
            log.info("job %s job_id=%s sop_instance_uid=%s", state.value.lower(), job.job_id, job.sop_instance_uid)

    def _retry(self, job: ClaimedJob, error: str) -> None:
        now = utcnow()
        delay = timedelta(seconds=min(300, 2**job.attempts))
        with self.sessions.begin() as session:
            session.execute(
                update(Job)
                .where(self._owned(job))
                .values(
                    state=JobState.QUEUED,
                    error=error,
                    leased_by=None,
                    lease_expires_at=None,
                    available_at=now + delay,
                    updated_at=now,
                )
            )


class WorkerPool(Loop):
    """``count`` worker threads plus periodic lease recovery; ``wake()`` after enqueueing to skip the poll wait."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        settings: Settings,
        processor: Processor,
        sink: ResultSink | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        disk = DiskPause(spool.guard, settings.data_dir, "jobs")
        super().__init__("chexd-worker", threads=settings.worker_threads, disk=disk)
        self.workers = [
            Worker(sessions, spool, settings, identity=worker_identity(i), processor=processor, sink=sink, disk=disk)
            for i in range(settings.worker_threads)
        ]
        self._last_recovery = 0.0

    def start(self) -> None:
        if self.workers:
            super().start()

    def thread_name(self, index: int) -> str:
        return f"chexd-{self.workers[index].identity}"

    def paused(self) -> bool:
        return False  # each Worker waits below the disk reserve itself (Worker.run_one)

    def poll_seconds(self) -> float:
        return self.settings.worker_poll_seconds

    def step(self, index: int) -> bool:
        """Thread 0 also re-queues jobs whose lease expired (their worker died), every 30 s."""
        now = utcnow().timestamp()
        if index == 0 and now - self._last_recovery > 30:
            requeue_expired(self.sessions)
            self._last_recovery = now
        return self.workers[index].run_one()
