"""Disk and database failures during C-STORE answer 0xA700 and leave no orphan file or row.

The SCP runs in-process here so the failure can be injected at the exact step; the peer is a real pynetdicom
association over TCP. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import daemon.store.instances
import daemon.store.spool
from daemon.edge.scp import Status, StorageSCP
from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import InstanceStore
from daemon.store.spool import Spool
from tests.conftest import free_port
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.peers import counts, send_raw, spool_files, temp_files


@pytest.fixture
def scp(tmp_path: Path, head_db_url: str) -> Iterator[StorageSCP]:
    settings = Settings(data_dir=tmp_path / "data", database_url=head_db_url, port=free_port(),
                        bind_address="127.0.0.1")
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    spool = Spool(settings.spool_dir, settings.quarantine_dir)
    server = StorageSCP(settings, InstanceStore(spool, session_factory(engine)))
    server.start()
    yield server
    server.stop()
    engine.dispose()


def test_database_failure_answers_out_of_resources_and_removes_the_file(scp, tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OperationalError("INSERT INTO instances", {}, Exception("database is gone"))

    monkeypatch.setattr(daemon.store.instances, "record_instance", broken)
    path = write_dataset(make_dataset(seed=1), tmp_path / "a.dcm")
    assert send_raw(scp.port, path) == Status.OUT_OF_RESOURCES
    data_dir = scp.settings.data_dir
    assert spool_files(data_dir) == [] and temp_files(data_dir) == []
    assert counts(scp.store.sessions.kw["bind"]) == {"instances": 0, "jobs": 0}

    monkeypatch.undo()
    assert send_raw(scp.port, path) == Status.SUCCESS, "the same instance is accepted once the database is back"
    assert len(spool_files(data_dir)) == 1


def test_disk_failure_answers_out_of_resources_and_leaves_nothing(scp, tmp_path, monkeypatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(daemon.store.spool.os, "fsync", broken_fsync)
    path = write_dataset(make_dataset(seed=2), tmp_path / "a.dcm")
    assert send_raw(scp.port, path) == Status.OUT_OF_RESOURCES
    data_dir = scp.settings.data_dir
    assert spool_files(data_dir) == [] and temp_files(data_dir) == []
    assert counts(scp.store.sessions.kw["bind"]) == {"instances": 0, "jobs": 0}
