"""The disk reserve and disk-full handling of every writer (daemon.store.spool DiskGuard/DiskPause), and the start-up
resumption of reports left WRITING (SQLite and PostgreSQL). That the report worker processes die with the daemon is
tested end to end in tests/integration/test_crash_safety.py."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import InstanceStore
from daemon.store.spool import (
    DISK_FULL_RESUME_MARGIN,
    DISK_FULL_RETRY_SECONDS,
    DiskGuard,
    DiskPause,
    DiskReserveError,
    Spool,
    is_disk_full,
)
from daemon.store.tables import Job, JobState, ReportState, StudyReportRow, utcnow
from daemon.work.reports import (
    WRITER_PREFIX,
    ReportLoop,
    remove_stale_staging,
    resume_orphaned_reports,
    save_archive,
)
from daemon.work.worker import HOST, JobResult, Worker
from model.types import Prediction
from tests.storegen import make_meta

MiB = 2**20
DEAD_PID = 4_000_000  # above pid_max's ceiling (4194304 is the most Linux allows; none is that high here)


class FakeFree:
    """Stands in for shutil.disk_usage's free bytes (the guard reads it through ``free_bytes``)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: Path) -> int:
        return self.free


# --- what counts as "disk full" -------------------------------------------------------------------------------------


def test_disk_full_is_recognised_in_every_form_the_writers_meet() -> None:
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    wrapped = OperationalError("INSERT ...", {}, sqlite_full)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("reportlab could not save") from inner
    except RuntimeError as chained:
        from_chain = chained
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(DiskReserveError(errno.ENOSPC, "below the reserve"))
    assert is_disk_full(wrapped)
    assert is_disk_full(from_chain)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad threshold"))
    assert not is_disk_full(OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")))


def test_the_guard_refuses_a_write_that_would_go_below_the_reserve(tmp_path: Path) -> None:
    guard = DiskGuard(10 * MiB)
    guard.free_bytes = FakeFree(12 * MiB)  # type: ignore[method-assign]
    guard.check(tmp_path, 2 * MiB)  # exactly at the reserve: allowed
    with pytest.raises(DiskReserveError, match="disk_reserve_mb") as caught:
        guard.check(tmp_path / "not" / "yet" / "there", 2 * MiB + 1)
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="reserve_bytes -1"):
        DiskGuard(-1)


# --- one log line per change of state -------------------------------------------------------------------------------


def test_a_paused_activity_logs_once_per_change_and_waits_for_space_after_a_disk_full_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = DiskGuard(100 * MiB)
    free = FakeFree(50 * MiB)
    guard.free_bytes = free  # type: ignore[method-assign]
    pause = DiskPause(guard, tmp_path, "reports")
    caplog.set_level(logging.WARNING, logger="daemon.store.spool")
    assert all(pause.blocked() for _ in range(100))
    free.free = 200 * MiB
    assert not any(pause.blocked() for _ in range(100))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "disk below reserve: reports paused (free 50 MiB < reserve 100 MiB)",
        "disk space back: reports resumed (free 200 MiB)",
    ]
    caplog.clear()
    for _ in range(50):  # a loop that keeps failing on a full disk says so once
        pause.hit(OSError(errno.ENOSPC, "No space left on device"))  # (a write needed more than the 200 MiB free)
    assert all(pause.blocked() for _ in range(10)), "after a disk-full error it waits for more space than then"
    free.free = 200 * MiB + DISK_FULL_RESUME_MARGIN
    assert not pause.blocked()
    pause.hit(OSError(errno.ENOSPC, "No space left on device"))
    assert pause.blocked()
    pause._error_at -= DISK_FULL_RETRY_SECONDS  # no more space, but a minute later: one more try
    assert not pause.blocked()
    assert [r.getMessage() for r in caplog.records] == [
        "disk full: reports paused until space returns (OSError: [Errno 28] No space left on device)",
        f"disk space back: reports resumed (free {200 + DISK_FULL_RESUME_MARGIN // MiB} MiB)",
        "disk full: reports paused until space returns (OSError: [Errno 28] No space left on device)",
        f"disk still full? reports try again (free {200 + DISK_FULL_RESUME_MARGIN // MiB} MiB)",
    ]


# --- writers --------------------------------------------------------------------------------------------------------


def test_quarantine_below_the_reserve_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", 0)
    spool.guard.free_bytes = FakeFree(5 * MiB)  # type: ignore[method-assign]
    spool.reserve_bytes = 10 * MiB
    with pytest.raises(DiskReserveError):
        spool.quarantine_bytes(b"garbage" * 100, "0xC000 cannot parse")
    assert list(spool.quarantine.iterdir()) == []


def test_a_quarantine_write_that_fails_midway_leaves_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", 0)
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the data file, after the reason file was written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space"):
        spool.quarantine_bytes(b"x" * 4096, "0xC000 cannot parse")
    assert list(spool.quarantine.iterdir()) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    path = spool.quarantine_bytes(b"x" * 4096, "0xC000 cannot parse")
    assert path.stat().st_size == 4096 and path.with_suffix(".reason.txt").is_file()
    assert sorted(p.suffix for p in spool.quarantine.iterdir()) == [".bin", ".txt"]


def test_stale_quarantine_parts_and_report_staging_are_removed_at_start_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", 0)
    (spool.quarantine / "20260101T000000-abc.bin.part").write_bytes(b"")
    kept = spool.quarantine / "20260101T000000-abd.bin"
    kept.write_bytes(b"x")
    staging = tmp_path / "reports" / "study-1" / f".r1.{DEAD_PID}.part"
    staging.mkdir(parents=True)
    (staging / "report.pdf").write_bytes(b"%PDF")
    live = tmp_path / "reports" / "study-1" / f".r2.{os.getppid()}.part"  # a live writer: left alone
    live.mkdir()
    archive_tmp = tmp_path / "results" / "1.2.3" / "v1.tmp.npz"
    archive_tmp.parent.mkdir(parents=True)
    archive_tmp.write_bytes(b"")
    assert spool.remove_stale_temp_files() == 1
    assert remove_stale_staging(tmp_path) == 2
    assert kept.exists() and live.exists() and not staging.exists() and not archive_tmp.exists()


def _prediction() -> Prediction:
    labels = ("Atelectasis", "Effusion")
    return Prediction(
        labels=labels,
        probabilities=np.array([0.1, 0.9], dtype=np.float32),
        logits=np.array([-2.0, 2.0], dtype=np.float32),
        cams=np.zeros((2, 7, 7), dtype=np.float32),
        top_channels=np.zeros((2, 3), dtype=np.int64),
        top_contributions=np.zeros((2, 3), dtype=np.float32),
        bias=np.zeros(2, dtype=np.float32),
        model_version="v1",
    )


def test_a_prediction_archive_below_the_reserve_is_not_written(tmp_path: Path) -> None:
    guard = DiskGuard(10 * MiB)
    guard.free_bytes = FakeFree(9 * MiB)  # type: ignore[method-assign]
    path = tmp_path / "results" / "1.2.3" / "v1.npz"
    with pytest.raises(DiskReserveError):
        save_archive(path, _prediction(), {"version": "v1"}, guard=guard)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []
    guard.free_bytes = FakeFree(100 * MiB)  # type: ignore[method-assign]
    save_archive(path, _prediction(), {"version": "v1"}, guard=guard)
    assert [p.name for p in path.parent.iterdir()] == ["v1.npz"]


# --- jobs and reports wait ------------------------------------------------------------------------------------------


@dataclass
class Env:
    sessions: sessionmaker[Session]
    settings: Settings
    spool: Spool
    dialect: str


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=head_db_url, disk_reserve_mb=0, report_workers=0)
    yield Env(
        session_factory(engine),
        settings,
        Spool(settings.spool_dir, settings.quarantine_dir, 0),
        engine.dialect.name,
    )
    engine.dispose()


class FullDiskSink:
    """A result sink whose archive write hits a full disk."""

    def save(self, job: object, result: JobResult) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def record(self, session: Session, job: object, result: JobResult) -> None:
        raise AssertionError("never reached")


def _job(env: Env) -> tuple[int, int]:
    meta = make_meta(1)
    InstanceStore(env.spool, env.sessions).save(meta, b"\x00" * 256, "MODALITY")
    with env.sessions() as session:
        job = session.scalars(select(Job)).one()
        return job.id, job.attempts


def _state(env: Env, job_id: int) -> tuple[JobState, int]:
    with env.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return JobState(job.state), job.attempts


def test_jobs_wait_below_the_reserve_and_a_full_disk_costs_no_attempt(env: Env) -> None:
    job_id, _ = _job(env)
    prediction = _prediction()

    def processor(path: Path) -> JobResult:
        return JobResult(image_stats={}, prediction=prediction)

    worker = Worker(
        env.sessions, env.spool, env.settings, identity=f"{HOST}/1/0", processor=processor, sink=FullDiskSink()
    )
    free = FakeFree(5 * MiB)
    env.spool.guard.free_bytes = free  # type: ignore[method-assign]
    env.spool.reserve_bytes = 10 * MiB
    assert worker.run_one() is False, "below the reserve nothing is claimed"
    assert _state(env, job_id) == (JobState.QUEUED, 0)

    env.spool.reserve_bytes = 0
    free.free = 10**12
    for _ in range(env.settings.job_max_attempts + 2):  # each try fails to write: none counts as an attempt
        worker.disk._after_error = False
        worker.disk._paused = False
        assert worker.run_one() is True
        assert _state(env, job_id) == (JobState.QUEUED, 0)
    assert worker.disk.paused


def _report(env: Env, state: ReportState, writer: str | None) -> int:
    meta = make_meta(1)
    InstanceStore(env.spool, env.sessions).save(meta, b"\x00" * 256, "MODALITY")
    with env.sessions.begin() as session:
        from daemon.store.tables import Study

        study_id = session.scalars(select(Study.id)).one()
        row = StudyReportRow(
            study_id=study_id,
            revision=1,
            state=state,
            due_at=utcnow() + timedelta(minutes=5),
            error=WRITER_PREFIX + writer if writer else None,
        )
        session.add(row)
        session.flush()
        return row.id


def _report_row(env: Env, report_id: int) -> tuple[ReportState, str | None]:
    with env.sessions() as session:
        row = session.get(StudyReportRow, report_id)
        assert row is not None
        return ReportState(row.state), row.error


@pytest.mark.parametrize(
    ("writer", "resumed"),
    [
        (f"{HOST}/{DEAD_PID}", True),  # this host, process gone
        (f"{HOST}/{os.getpid()}", True),  # this pid at start-up: an earlier process's, pid reused
        (f"{HOST}/{os.getppid()}", False),  # this host, process alive: another daemon is writing it
        (f"other-node/{DEAD_PID}", False),  # another node (shared PostgreSQL): its lease decides
    ],
)
def test_reports_left_writing_by_a_dead_process_resume_at_start_up(env: Env, writer: str, resumed: bool) -> None:
    report_id = _report(env, ReportState.WRITING, writer)
    assert resume_orphaned_reports(env.sessions) == int(resumed)
    state, note = _report_row(env, report_id)
    if resumed:
        assert (state, note) == (ReportState.PENDING, None)
        with env.sessions() as session:
            assert session.get(StudyReportRow, report_id).due_at <= utcnow()  # type: ignore[union-attr]
    else:
        assert state is ReportState.WRITING


def test_a_writing_report_without_a_recorded_writer_resumes_only_on_a_single_node_database(env: Env) -> None:
    _report(env, ReportState.WRITING, None)
    assert resume_orphaned_reports(env.sessions) == (1 if env.dialect == "sqlite" else 0)


def test_a_claimed_report_names_its_writer_and_a_full_disk_puts_it_back_to_pending(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_id = _report(env, ReportState.PENDING, None)
    with env.sessions.begin() as session:
        session.execute(update(StudyReportRow).values(due_at=utcnow() - timedelta(seconds=1)))
    loop = ReportLoop(env.sessions, env.spool, env.settings)
    seen: list[tuple[ReportState, str | None]] = []

    def write(report_id: int) -> None:
        seen.append(_report_row(env, report_id))
        raise OSError(errno.ENOSPC, "disk full while writing the report")

    monkeypatch.setattr(loop, "write", write)
    assert loop.run_one() is True
    assert seen == [(ReportState.WRITING, f"{WRITER_PREFIX}{HOST}/{os.getpid()}")]
    assert _report_row(env, report_id) == (ReportState.PENDING, "waiting for disk space")
    assert loop.disk.paused


def test_forwards_wait_below_the_reserve_and_a_full_disk_is_one_line_not_a_traceback_per_try(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.work.forward import ForwardLoop

    settings = Settings(data_dir=tmp_path, forward_destinations=("PACS@127.0.0.1:104",), worker_poll_seconds=0.05)
    guard = DiskGuard(10 * MiB)
    free = FakeFree(5 * MiB)
    guard.free_bytes = free  # type: ignore[method-assign]
    loop = ForwardLoop(None, settings, guard=guard)  # type: ignore[arg-type]
    tries: list[float] = []

    def run_once() -> bool:
        tries.append(time.monotonic())
        raise OperationalError("UPDATE forwards ...", {}, sqlite3.OperationalError("database or disk is full"))

    loop.run_once = run_once  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING)
    loop.start()
    try:
        time.sleep(0.5)
        assert tries == [], "nothing is claimed below the reserve"
        free.free = 100 * MiB
        time.sleep(1.0)
    finally:
        loop.stop(timeout=5)
    assert len(tries) == 1, "after the disk-full error it waits for space instead of trying again"
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "daemon.store.spool"] == [
        "disk below reserve: forwards paused",
        "disk space back: forwards resumed",
        "disk full: forwards paused until space returns",
    ]
