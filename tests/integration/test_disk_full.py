"""A full disk, for real: the data dir on a small tmpfs created here (real ENOSPC), filled with a filler file.

Below ``disk_reserve_mb`` a C-STORE gets 0xA700 (Out of Resources) and nothing is written - good or bad input, no
0-byte file, no row; study reports wait (one log line when they pause, one when they resume) and are written once
space returns. With no reserve and a disk that is truly full, stores still answer 0xA700 and leave nothing half
written. Every case ends with a C-ECHO and a C-STORE (dcmtk) that succeed once space is back.

Needs root to mount the tmpfs (CI runs as root); without it the module fails, it does not skip.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from daemon.service import Daemon
from daemon.settings import Settings
from daemon.store.tables import Instance, Study, StudyReportRow
from daemon.work.worker import decode_statistics
from model.phantom import generate, to_dicom
from tests.conftest import DaemonProcess, free_port, running_daemon
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.peers import send_raw, write_raw

MiB = 2**20
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
DX = "1.2.840.10008.5.1.4.1.1.1.1"
RESERVE_MB = 8


class TinyDisk:
    """A tmpfs of ``size_mb`` MiB mounted at ``root``; ``fill_to(free)`` grows or shrinks a filler file."""

    def __init__(self, size_mb: int) -> None:
        if os.geteuid() != 0:
            pytest.fail(
                "the disk-full tests mount a tmpfs and must run as root (CI does); "
                f"running as uid {os.geteuid()}", pytrace=False
            )
        self.root = Path(tempfile.mkdtemp(prefix="chexd-tinyfs-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.root)], check=True)
        self.filler = self.root / "filler"

    def free(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill_to(self, free_bytes: int) -> None:
        """Leave about ``free_bytes`` free (0: the disk is truly full)."""
        current = self.filler.stat().st_size if self.filler.exists() else 0
        if free_bytes == 0:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for size in (MiB, 65536, 4096, 1):
                    chunk = b"\xff" * size
                    while True:
                        try:
                            os.write(fd, chunk)
                        except OSError:
                            break
            finally:
                os.close(fd)
            return
        target = max(0, current + self.free() - free_bytes)
        if target < current:
            os.truncate(self.filler, target)
        else:
            with open(self.filler, "ab") as fh:
                os.posix_fallocate(fh.fileno(), 0, target)

    def space_back(self) -> None:
        self.filler.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and p != self.filler]

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _empty_files(disk: TinyDisk) -> list[str]:
    return [str(p) for p in disk.files() if p.stat().st_size == 0 and p.suffix not in (".db-wal", ".db-shm")]


def _quarantine_state(quarantine: Path) -> tuple[list[str], list[str]]:
    """(.bin files without their .reason.txt, unfinished .part files) in the quarantine."""
    orphans = [p.name for p in quarantine.glob("*.bin") if not p.with_suffix(".reason.txt").exists()]
    return orphans, [p.name for p in quarantine.glob("*.part")]


def _stored(engine, sop_uid: str) -> bool:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid)) is not None


def _good(tmp_path: Path, seed: int) -> tuple[Path, str]:
    ds = make_dataset(seed=seed, rows=256, columns=256)
    path = write_dataset(ds, tmp_path / f"good-{seed}.dcm")
    return path, str(ds.SOPInstanceUID)


def _garbage(tmp_path: Path, name: str, size: int = 300_000) -> Path:
    return write_raw(tmp_path / f"{name}.dcm", DX, generate_uid(), os.urandom(size))


def _echo_and_store(port: int, engine, tmp_path: Path, seed: int) -> None:  # type: ignore[no-untyped-def]
    """The normal traffic that must work again once space is back: dcmtk echoscu, then storescu."""
    echo = subprocess.run(["echoscu", "-to", "5", "-aec", "CHEXD", "127.0.0.1", str(port)], capture_output=True)
    assert echo.returncode == 0, echo.stderr
    path, uid = _good(tmp_path, seed)
    store = subprocess.run(
        ["storescu", "-to", "10", "-aec", "CHEXD", "127.0.0.1", str(port), str(path)], capture_output=True, text=True
    )
    assert store.returncode == 0, store.stderr
    assert _stored(engine, uid)


# --- a daemon with the model and an 8 MiB reserve ------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk() -> Iterator[TinyDisk]:
    tiny = TinyDisk(48)
    yield tiny
    tiny.close()


@pytest.fixture(scope="module")
def daemon(disk: TinyDisk) -> Iterator[DaemonProcess]:
    with running_daemon(
        disk.root, disk_reserve_mb=str(RESERVE_MB), model_device="cpu", report_quiet_seconds="2", report_workers="1"
    ) as process:
        yield process
    process.log_path.unlink(missing_ok=True)


def test_a_store_below_the_reserve_gets_0xA700_and_writes_nothing(daemon, disk, tmp_path: Path) -> None:
    engine = daemon.engine()
    path, uid = _good(tmp_path, 1)

    def spooled() -> list[Path]:
        return sorted(p for folder in ("spool", "quarantine") for p in (disk.root / folder).rglob("*") if p.is_file())

    before = spooled()
    disk.fill_to((RESERVE_MB - 3) * MiB)
    assert send_raw(daemon.port, path) == OUT_OF_RESOURCES
    assert not _stored(engine, uid)
    assert spooled() == before, "no file of the refused store"
    disk.space_back()
    _echo_and_store(daemon.port, engine, tmp_path, 2)


def test_bad_input_below_the_reserve_gets_0xA700_and_no_quarantine_file(daemon, disk, tmp_path: Path) -> None:
    quarantine = disk.root / "quarantine"
    kept = sorted(p.name for p in quarantine.iterdir())
    garbage = _garbage(tmp_path, "garbage")
    disk.fill_to((RESERVE_MB - 3) * MiB)
    statuses = [send_raw(daemon.port, garbage) for _ in range(5)]
    assert statuses == [OUT_OF_RESOURCES] * 5
    assert sorted(p.name for p in quarantine.iterdir()) == kept
    assert _empty_files(disk) == []
    disk.space_back()
    assert send_raw(daemon.port, garbage) == CANNOT_UNDERSTAND  # space back: refused as usual and quarantined
    added = sorted(set(p.name for p in quarantine.iterdir()) - set(kept))
    assert [name.split(".", 1)[1] for name in added] == ["bin", "reason.txt"]
    assert _quarantine_state(quarantine) == ([], [])
    _echo_and_store(daemon.port, daemon.engine(), tmp_path, 3)


def test_reports_wait_below_the_reserve_with_one_log_line_and_are_written_when_space_returns(
    daemon, disk, tmp_path: Path
) -> None:
    engine = daemon.engine()
    ds = to_dicom(generate(0, 0, size=384, force={"Effusion": True}))
    source = tmp_path / "effusion.dcm"
    ds.save_as(source, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    offset = len(daemon.log())
    assert daemon.storescu(str(source)).returncode == 0

    def report() -> tuple[int, str] | None:
        with engine.connect() as conn:
            row = conn.execute(
                select(StudyReportRow.study_id, StudyReportRow.state)
                .join(Study, Study.id == StudyReportRow.study_id)
                .where(Study.study_instance_uid == study)
            ).first()
        return None if row is None else (row[0], str(row[1]))

    def report_state() -> str | None:
        found = report()
        return None if found is None else found[1]

    deadline = time.monotonic() + 90
    while report_state() != "PENDING" and time.monotonic() < deadline:  # the image analysed; the report is due soon
        time.sleep(0.1)
    assert report_state() == "PENDING"
    disk.fill_to((RESERVE_MB - 3) * MiB)
    time.sleep(4)  # past the 2 s quiet time: the report would have been written by now
    assert report_state() == "PENDING"
    paused = daemon.log()[offset:]
    assert paused.count("disk below reserve: reports paused") == 1, paused[-3000:]
    study_id = report()[0]  # type: ignore[index]
    assert not any((disk.root / "reports" / name).exists() for name in (study, f"study-{study_id}")), \
        "nothing of the report written"

    disk.space_back()
    deadline = time.monotonic() + 60
    while report_state() != "DONE" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert report_state() == "DONE"
    log = daemon.log()[offset:]
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if " ERROR " in line] == []
    # from this test's pause on (the previous test's "resumed" may land after the offset)
    since_pause = log[log.index("disk below reserve: ") :]
    disk_lines = [line for line in since_pause.splitlines() if "disk" in line]
    assert since_pause.count("disk space back: reports resumed") == 1, disk_lines
    assert len(disk_lines) <= 4, disk_lines  # jobs and reports: paused once, resumed once; never a line per try
    _echo_and_store(daemon.port, engine, tmp_path, 4)


def test_the_daemon_logged_no_traceback_and_left_no_empty_file(daemon, disk) -> None:
    assert "Traceback" not in daemon.log()
    assert _empty_files(disk) == []
    assert _quarantine_state(disk.root / "quarantine") == ([], [])


# --- no reserve, and a disk that is truly full -----------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def full() -> Iterator[tuple[Daemon, TinyDisk, Records]]:
    """An in-process daemon (no model: decode statistics only) with disk_reserve_mb=0 on a 16 MiB tmpfs."""
    tiny = TinyDisk(16)
    settings = Settings(
        data_dir=tiny.root,
        port=free_port(),
        bind_address="127.0.0.1",
        disk_reserve_mb=0,
        report_workers=0,
        worker_poll_seconds=0.2,
    )
    node = Daemon(settings, processor=decode_statistics)
    records = Records()
    logging.getLogger().addHandler(records)
    node.start()
    try:
        yield node, tiny, records
    finally:
        node.stop()
        logging.getLogger().removeHandler(records)
        tiny.close()


def test_a_store_on_a_truly_full_disk_gets_0xA700_and_leaves_nothing_half_written(full, tmp_path: Path) -> None:
    node, tiny, records = full
    records.records.clear()
    path, uid = _good(tmp_path, 11)
    tiny.fill_to(0)
    assert tiny.free() < 64 * 1024
    assert send_raw(node.settings.port, path) == OUT_OF_RESOURCES
    assert not _stored(node.engine, uid)
    assert _empty_files(tiny) == []
    assert list(node.spool.tmp.iterdir()) == []
    assert not [r for r in records.records if r.exc_info], "a log line, not a traceback"
    tiny.space_back()
    _echo_and_store(node.settings.port, node.engine, tmp_path, 12)


def test_bad_input_on_a_truly_full_disk_gets_0xA700_and_no_bin_without_its_reason(full, tmp_path: Path) -> None:
    node, tiny, records = full
    records.records.clear()
    quarantine = node.spool.quarantine
    kept = sorted(p.name for p in quarantine.iterdir())
    tiny.fill_to(0)
    garbage = _garbage(tmp_path, "garbage-full", size=200_000)
    statuses = [send_raw(node.settings.port, garbage) for _ in range(3)]
    assert statuses == [OUT_OF_RESOURCES] * 3
    assert sorted(p.name for p in quarantine.iterdir()) == kept, "no .bin, no .part, no reason file"
    assert _empty_files(tiny) == []
    assert not [r for r in records.records if r.exc_info]
    tiny.fill_to(4 * MiB)  # a little space: enough for the reason file, not for the data (it is 200 kB: it fits)
    assert send_raw(node.settings.port, garbage) == CANNOT_UNDERSTAND
    assert _quarantine_state(quarantine) == ([], [])
    tiny.space_back()
    _echo_and_store(node.settings.port, node.engine, tmp_path, 13)


def test_pydicom_reads_what_was_stored_after_the_disk_was_full(full) -> None:
    node, tiny, _ = full
    stored = list(node.spool.iter_files())
    assert stored, "the follow-up stores are on disk"
    for rel in stored:
        pydicom.dcmread(node.spool.path_of(rel))  # complete files, not cut short
