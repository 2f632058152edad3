"""daemon.store.instances: file in the spool and rows in the database, both or neither (SQLite and real PostgreSQL)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sqlalchemy
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import daemon.store.instances
from daemon.edge.intake import inspect
from daemon.store import spool as spool_module
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import InstanceStore, StoreOutcome
from daemon.store.spool import Spool
from daemon.store.tables import Instance, Job, JobState, Series, Study
from tests.storegen import ROOT, make_meta, rel_of

PAYLOAD = b"\x00" * 128 + b"DICM" + bytes(range(200))


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    store: InstanceStore

    def count(self, table: type) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(table)) or 0

    def nothing_left(self) -> None:
        assert list(self.spool.iter_files()) == []
        assert list(self.spool.tmp.iterdir()) == []
        assert [self.count(t) for t in (Study, Series, Instance, Job)] == [0, 0, 0, 0]


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    yield Env(engine, sessions, spool, InstanceStore(spool, sessions))
    engine.dispose()


def test_save_stores_file_rows_and_a_queued_job(env: Env) -> None:
    meta = make_meta()
    stored: list[bool] = []
    outcome = env.store.save(meta, PAYLOAD, "MODALITY1", after_commit=lambda: stored.append(True))
    assert outcome is StoreOutcome.STORED
    assert stored == [True]
    assert (env.spool.root / rel_of(meta)).read_bytes() == PAYLOAD
    assert list(env.spool.tmp.iterdir()) == []
    with env.sessions() as session:
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series)).one()
        instance = session.scalars(select(Instance)).one()
        job = session.scalars(select(Job)).one()
        assert (study.study_instance_uid, study.study_date) == (meta.study_instance_uid, "20240101")
        assert (series.series_instance_uid, series.study_id, series.modality) == (
            meta.series_instance_uid,
            study.id,
            "DX",
        )
        assert instance.sop_instance_uid == meta.sop_instance_uid
        assert instance.series_id == series.id
        assert instance.path == rel_of(meta)
        assert instance.size_bytes == len(PAYLOAD)
        assert instance.calling_ae == "MODALITY1"
        assert (instance.body_part, instance.view_position, instance.skip_reason) == ("CHEST", "PA", None)
        assert (job.instance_id, job.state, job.attempts, job.error) == (instance.id, JobState.QUEUED, 0, None)
    assert env.store.exists(meta.sop_instance_uid)


def test_instances_of_one_study_share_study_and_series_rows(env: Env) -> None:
    for meta in (make_meta(1), make_meta(2), make_meta(1, series=2)):
        assert env.store.save(meta, PAYLOAD, None) is StoreOutcome.STORED
    assert [env.count(t) for t in (Study, Series, Instance, Job)] == [1, 2, 3, 3]


def test_duplicate_changes_nothing(env: Env) -> None:
    meta = make_meta()
    env.store.save(meta, PAYLOAD, "FIRST")
    calls: list[bool] = []
    outcome = env.store.save(meta, PAYLOAD, "SECOND", after_commit=lambda: calls.append(True))
    assert outcome is StoreOutcome.DUPLICATE
    assert calls == []
    assert (env.spool.root / rel_of(meta)).read_bytes() == PAYLOAD
    assert list(env.spool.tmp.iterdir()) == []
    assert [env.count(t) for t in (Instance, Job)] == [1, 1]
    with env.sessions() as session:
        assert session.scalar(select(Instance.calling_ae)) == "FIRST"


def test_concurrent_saves_of_one_instance_store_it_once(env: Env) -> None:
    meta = make_meta()
    outcomes: list[StoreOutcome] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def save(i: int) -> None:
        try:
            barrier.wait()
            outcomes.append(env.store.save(meta, PAYLOAD, f"AE{i}"))  # a resend with other content: test_identity
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(o.value for o in outcomes) == ["duplicate"] * 5 + ["stored"]
    assert [env.count(t) for t in (Instance, Job)] == [1, 1]
    assert list(env.spool.iter_files()) == [rel_of(meta)]
    assert list(env.spool.tmp.iterdir()) == []


def test_gated_instance_is_stored_with_a_skipped_job(env: Env) -> None:
    reason = "not a frontal view: ViewPosition=LL"
    meta = replace(make_meta(), view_position="LL", skip_reason=reason)
    assert env.store.save(meta, PAYLOAD, None) is StoreOutcome.STORED
    assert (env.spool.root / rel_of(meta)).exists()
    with env.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.state, job.error) == (JobState.SKIPPED, reason)
        assert session.scalar(select(Instance.skip_reason)) == reason


def test_database_failure_raises_and_leaves_no_file_and_no_rows(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real_record = daemon.store.instances.record_instance

    def record_then_fail(session: Session, *args: object, **kwargs: object) -> Instance:
        real_record(session, *args, **kwargs)  # type: ignore[arg-type]
        session.flush()  # the rows reach the database before the failure, so rollback is what removes them
        raise OperationalError("INSERT INTO jobs", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(daemon.store.instances, "record_instance", record_then_fail)
    calls: list[bool] = []
    with pytest.raises(SQLAlchemyError):
        env.store.save(make_meta(), PAYLOAD, None, after_commit=lambda: calls.append(True))
    assert calls == []
    env.nothing_left()
    monkeypatch.undo()
    assert env.store.save(make_meta(), PAYLOAD, None) is StoreOutcome.STORED  # nothing blocks a retry


def test_disk_failure_raises_and_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        env.store.save(make_meta(), PAYLOAD, None)
    monkeypatch.undo()
    env.nothing_left()


def test_failed_rename_raises_and_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        env.store.save(make_meta(), PAYLOAD, None)
    monkeypatch.undo()
    env.nothing_left()


def test_disk_reserve_refuses_the_write_and_leaves_nothing(env: Env) -> None:
    env.spool.reserve_bytes = env.spool.free_bytes() + 2**40
    with pytest.raises(OSError, match="reserve"):
        env.store.save(make_meta(), PAYLOAD, None)
    env.nothing_left()


def test_over_long_view_position_from_a_sender_is_stored_on_every_backend(env: Env) -> None:
    """A CS value longer than its 16-character limit is a sender's mistake, not a reason to answer 0xA700 (which
    makes the sender retry for ever) on PostgreSQL while the same image is stored on SQLite."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = f"{ROOT}.1.1.1"
    ds.StudyInstanceUID = f"{ROOT}.1"
    ds.SeriesInstanceUID = f"{ROOT}.1.1"
    ds.Modality = "DX"
    with pytest.warns(UserWarning, match="exceeds the maximum length of 16"):
        ds.ViewPosition = "POSTERO ANTERIOR ERECT"  # 22 characters
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 8, 8, 1, 8
    ds.PixelData = bytes(64)
    meta = inspect(ds, ExplicitVRLittleEndian)
    assert env.store.save(meta, PAYLOAD, None) is StoreOutcome.STORED
    assert env.count(Instance) == 1


# --- the hot path (bench/README.md "store_throughput") ---------------------------------------------------------------


def _statements(env: Env) -> list[str]:
    """The SQL statements (first word, upper case) the engine executes from now on, collected into a list."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement.split(None, 1)[0].upper())

    sqlalchemy.event.listen(env.engine, "before_cursor_execute", record)
    return seen


def test_the_next_image_of_a_stored_series_takes_four_statements(env: Env) -> None:
    """Duplicate look-up, one read of series + study, instance and job inserts; no study/series insert-or-ignore."""
    env.store.save(make_meta(1), PAYLOAD, None)
    seen = _statements(env)
    assert env.store.save(make_meta(2), PAYLOAD, "MODALITY2") is StoreOutcome.STORED
    assert seen == ["SELECT", "SELECT", "INSERT", "INSERT"]
    assert [env.count(t) for t in (Study, Series, Instance, Job)] == [1, 1, 2, 2]
    with env.sessions() as session:
        assert session.scalars(select(Job.state)).all() == [JobState.QUEUED, JobState.QUEUED]
        assert session.scalar(select(Instance.calling_ae).where(Instance.sop_instance_uid.endswith(".2"))) == (
            "MODALITY2"
        )


def test_a_new_series_of_a_stored_study_takes_the_checked_path(env: Env) -> None:
    env.store.save(make_meta(1, series=1), PAYLOAD, None)
    assert env.store.save(make_meta(1, series=2), PAYLOAD, None) is StoreOutcome.STORED
    assert [env.count(t) for t in (Study, Series, Instance, Job)] == [1, 2, 2, 2]


def test_pending_write_hashes_the_file_and_save_claims_it(env: Env) -> None:
    chunks = [PAYLOAD[:100], memoryview(PAYLOAD)[100:]]
    pending = env.store.begin_write(chunks)
    try:
        assert env.store.save(make_meta(), chunks, None, pending=pending) is StoreOutcome.STORED
    finally:
        pending.close()
    assert (env.spool.root / rel_of(make_meta())).read_bytes() == PAYLOAD
    with env.sessions() as session:
        assert session.scalar(select(Instance.sha256)) == hashlib.sha256(PAYLOAD).hexdigest()
    assert list(env.spool.tmp.iterdir()) == []


def test_an_unclaimed_pending_write_leaves_no_temp_file(env: Env) -> None:
    """The SCP refused the dataset after the write had started: closing the pending write removes its temp file."""
    pending = env.store.begin_write(PAYLOAD)
    pending.close()
    env.nothing_left()


def test_a_failed_pending_write_raises_from_save_and_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fsync", broken_fsync)
    pending = env.store.begin_write(PAYLOAD)
    try:
        with pytest.raises(OSError, match="Input/output"):
            env.store.save(make_meta(), PAYLOAD, None, pending=pending)
    finally:
        pending.close()
    monkeypatch.undo()
    env.nothing_left()
