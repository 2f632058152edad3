"""daemon.store.recovery: after a crash, spool and database agree again (SQLite and real PostgreSQL)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.recovery import recover
from daemon.store.spool import Spool
from daemon.store.tables import AuditEvent, Instance, Job, JobState, Series, Study, utcnow

ROOT = "1.2.826.0.1.3680043.10.9999"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool

    def count(self, table: type) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(table)) or 0


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    yield Env(engine, session_factory(engine), Spool(tmp_path / "spool", tmp_path / "quarantine"))
    engine.dispose()


def write_orphan(spool: Spool, n: int = 1, *, modality: str = "DX", sop_class: str = DX_FOR_PRESENTATION) -> str:
    """Write a small valid DICOM file into the spool (as a crash between rename and commit leaves it)."""
    study, series, sop = f"{ROOT}.5", f"{ROOT}.5.1", f"{ROOT}.5.1.{n}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyDate = "20240202"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows = 8
    ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8 * 8 * 2)
    rel = spool.relative_path(study, series, sop)
    path = spool.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return rel


def test_recover_removes_stale_temp_files(env: Env) -> None:
    env.spool.write_temp(b"half a dataset")
    (env.spool.tmp / "crashed.part").write_bytes(b"more")
    report = recover(env.spool, env.sessions)
    assert report.temp_files_removed == 2
    assert list(env.spool.tmp.iterdir()) == []


def test_recover_reindexes_a_valid_file_without_rows(env: Env) -> None:
    rel = write_orphan(env.spool)
    report = recover(env.spool, env.sessions)
    assert (report.files_reindexed, report.files_quarantined) == (1, 0)
    with env.sessions() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.sop_instance_uid == f"{ROOT}.5.1.1"
        assert instance.path == rel
        assert instance.size_bytes == (env.spool.root / rel).stat().st_size
        assert instance.transfer_syntax_uid == ExplicitVRLittleEndian
        assert (instance.modality, instance.body_part, instance.skip_reason) == ("DX", "CHEST", None)
        job = session.scalars(select(Job)).one()
        assert (job.instance_id, job.state) == (instance.id, JobState.QUEUED)
        assert session.scalar(select(Study.study_instance_uid)) == f"{ROOT}.5"
        assert session.scalar(select(Series.series_instance_uid)) == f"{ROOT}.5.1"
        events = session.scalars(select(AuditEvent).where(AuditEvent.event == "startup_recovery")).all()
        assert len(events) == 1
    assert (env.spool.root / rel).exists()


def test_recover_reindexes_a_gated_orphan_as_skipped(env: Env) -> None:
    write_orphan(env.spool, modality="CT", sop_class=CT_IMAGE)
    recover(env.spool, env.sessions)
    with env.sessions() as session:
        assert session.scalar(select(Job.state)) is JobState.SKIPPED
        assert "Modality=CT" in (session.scalar(select(Instance.skip_reason)) or "")


def test_recover_quarantines_a_garbage_file_in_the_spool(env: Env) -> None:
    garbage = b"this is not DICOM at all \x00\x01\x02"
    rel = f"{ROOT}.6/{ROOT}.6.1/{ROOT}.6.1.1.dcm"
    path = env.spool.root / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    report = recover(env.spool, env.sessions)
    assert (report.files_reindexed, report.files_quarantined) == (0, 1)
    assert not path.exists()
    kept = list(env.spool.quarantine.glob("*.bin"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage
    reason = kept[0].with_suffix(".reason.txt").read_text(encoding="utf-8")
    assert "re-index" in reason
    assert env.count(Instance) == 0


def test_recover_quarantines_a_dicom_file_with_unusable_pixels(env: Env) -> None:
    rel = write_orphan(env.spool)
    path = env.spool.root / rel
    path.write_bytes(path.read_bytes()[:-40])  # truncated pixel data
    report = recover(env.spool, env.sessions)
    assert report.files_quarantined == 1
    assert not path.exists()
    assert env.count(Instance) == 0


def test_recover_twice_adopts_nothing_the_second_time(env: Env) -> None:
    write_orphan(env.spool, 1)
    write_orphan(env.spool, 2)
    first = recover(env.spool, env.sessions)
    assert first.files_reindexed == 2
    second = recover(env.spool, env.sessions)
    assert (second.temp_files_removed, second.jobs_requeued, second.files_reindexed, second.files_quarantined) == (
        0,
        0,
        0,
        0,
    )
    assert [env.count(Instance), env.count(Job)] == [2, 2]
    with env.sessions() as session:  # a quiet start-up writes no audit event
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 1


def test_recover_requeues_jobs_of_a_dead_worker_on_this_host(env: Env) -> None:
    write_orphan(env.spool)
    recover(env.spool, env.sessions)
    with env.sessions.begin() as session:
        session.execute(
            update(Job).values(
                state=JobState.RUNNING,
                attempts=1,
                leased_by=f"{socket.gethostname()}/999999/0",
                lease_expires_at=utcnow() + timedelta(minutes=5),
            )
        )
    report = recover(env.spool, env.sessions)
    assert report.jobs_requeued == 1
    with env.sessions() as session:
        assert session.scalar(select(Job.state)) is JobState.QUEUED
