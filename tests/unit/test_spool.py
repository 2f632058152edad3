"""daemon.store.spool: UID validation, atomic durable writes, disk reserve, quarantine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from daemon.store import spool as spool_module
from daemon.store.spool import DiskReserveError, InvalidUIDError, Spool, validate_uid

STUDY = "1.2.826.0.1.3680043.10.9999.1"
SERIES = "1.2.826.0.1.3680043.10.9999.1.1"
SOP = "1.2.826.0.1.3680043.10.9999.1.1.1"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", tmp_path / "quarantine")


def tmp_contents(spool: Spool) -> list[Path]:
    return list(spool.tmp.iterdir())


@pytest.mark.parametrize("uid", ["0", "1.2.3", "1.2.840.10008.1.2.1", "2.25.0", "1." + "2" * 62, SOP])
def test_validate_uid_accepts_well_formed_uids(uid: str) -> None:
    assert validate_uid(uid, "SOPInstanceUID") == uid


def test_validate_uid_strips_dicom_padding() -> None:
    assert validate_uid("1.2.3\x00", "SOPInstanceUID") == "1.2.3"
    assert validate_uid("1.2.3 ", "SOPInstanceUID") == "1.2.3"


@pytest.mark.parametrize(
    "uid",
    [
        "",
        None,
        "..",
        ".",
        "1.2/../x",
        "../../etc/passwd",
        "1.02",
        "01.2",
        "1..2",
        "1.2.",
        ".1.2",
        "1." + "2" * 63,  # 65 characters
        "1.2.abc",
        "1.2.3e5",
        "1.2 .3",
        "-1.2",
        "1.2\\3",
    ],
)
def test_validate_uid_rejects_malformed_uids(uid: str | None) -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(uid, "SOPInstanceUID")


def test_validate_uid_error_names_the_attribute() -> None:
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        validate_uid("1.02", "StudyInstanceUID")


def test_relative_path_is_study_series_instance(spool: Spool) -> None:
    assert spool.relative_path(STUDY, SERIES, SOP) == f"{STUDY}/{SERIES}/{SOP}.dcm"


@pytest.mark.parametrize(
    "parts",
    [
        ("..", SERIES, SOP),
        (STUDY, "..", SOP),
        (STUDY, SERIES, "../../x"),
        ("/etc", SERIES, SOP),
        (STUDY, SERIES, ".tmp"),
        ("", SERIES, SOP),
    ],
)
def test_relative_path_never_leaves_the_root(spool: Spool, parts: tuple[str, str, str]) -> None:
    with pytest.raises(InvalidUIDError):
        spool.relative_path(*parts)


@pytest.mark.parametrize("rel", ["../outside.dcm", "/etc/passwd", f"{STUDY}/../../x.dcm", ".tmp/abc.part"])
def test_path_of_refuses_paths_outside_the_spool_or_in_tmp(spool: Spool, rel: str) -> None:
    with pytest.raises(InvalidUIDError):
        spool.path_of(rel)


def test_write_temp_and_commit_put_bytes_at_the_path(spool: Spool) -> None:
    data = b"DICM" + bytes(range(256)) * 4
    rel = spool.relative_path(STUDY, SERIES, SOP)
    tmp = spool.write_temp(data)
    assert tmp.parent == spool.tmp and tmp.read_bytes() == data
    spooled = spool.commit(tmp, rel)
    assert spooled.relative_path == rel
    assert spooled.absolute_path == spool.root / rel
    assert spooled.size_bytes == len(data)
    assert (spool.root / rel).read_bytes() == data
    assert tmp_contents(spool) == []


def test_failed_rename_leaves_no_temp_and_no_final_file(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = spool.relative_path(STUDY, SERIES, SOP)
    tmp = spool.write_temp(b"payload")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        spool.commit(tmp, rel)
    monkeypatch.undo()
    assert tmp_contents(spool) == []
    assert not (spool.root / rel).exists()
    assert list(spool.iter_files()) == []


def test_failed_fsync_in_write_temp_leaves_no_temp_file(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        spool.write_temp(b"payload")
    monkeypatch.undo()
    assert tmp_contents(spool) == []


def test_check_reserve_raises_when_reserve_exceeds_free_space(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", reserve_bytes=free + 2**40)
    with pytest.raises(DiskReserveError, match="reserve"):
        spool.check_reserve(0)


def test_check_reserve_counts_the_incoming_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", reserve_bytes=1000)
    monkeypatch.setattr(spool_module.shutil, "disk_usage", lambda _p: usage._replace(free=1500))
    spool.check_reserve(500)  # exactly at the reserve: allowed
    with pytest.raises(DiskReserveError):
        spool.check_reserve(501)


def test_disk_reserve_error_is_an_oserror() -> None:
    assert issubclass(DiskReserveError, OSError)


def test_write_temp_below_reserve_leaves_nothing(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine", reserve_bytes=free + 2**40)
    with pytest.raises(DiskReserveError):
        spool.write_temp(b"x" * 1024)
    assert tmp_contents(spool) == []


def test_remove_stale_temp_files_deletes_partial_writes(spool: Spool) -> None:
    spool.write_temp(b"one")
    spool.write_temp(b"two")
    (spool.tmp / "leftover.part").write_bytes(b"three")
    rel = spool.relative_path(STUDY, SERIES, SOP)
    spool.commit(spool.write_temp(b"kept"), rel)
    assert spool.remove_stale_temp_files() == 3
    assert tmp_contents(spool) == []
    assert (spool.root / rel).read_bytes() == b"kept"
    assert spool.remove_stale_temp_files() == 0


def test_quarantine_bytes_writes_data_and_reason(spool: Spool) -> None:
    path = spool.quarantine_bytes(b"\x00garbage\xff", "cannot parse: no preamble")
    assert path.parent == spool.quarantine
    assert path.suffix == ".bin"
    assert path.read_bytes() == b"\x00garbage\xff"
    reason = path.with_suffix(".reason.txt")
    assert reason.read_text(encoding="utf-8").strip() == "cannot parse: no preamble"
    assert sorted(p.name for p in spool.quarantine.iterdir()) == sorted([path.name, reason.name])


def test_quarantine_keeps_each_file_separately(spool: Spool) -> None:
    a = spool.quarantine_bytes(b"a", "first")
    b = spool.quarantine_bytes(b"b", "second")
    assert a != b
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")


def test_iter_files_lists_stored_files_and_skips_tmp(spool: Spool) -> None:
    rel = spool.relative_path(STUDY, SERIES, SOP)
    spool.commit(spool.write_temp(b"stored"), rel)
    spool.write_temp(b"partial")
    (spool.tmp / "looks-final.dcm").write_bytes(b"partial")
    (spool.root / STUDY / "notes.txt").write_text("not a dicom file")
    assert list(spool.iter_files()) == [rel]


def test_remove_deletes_a_stored_file(spool: Spool) -> None:
    rel = spool.relative_path(STUDY, SERIES, SOP)
    spool.commit(spool.write_temp(b"stored"), rel)
    spool.remove(rel)
    assert not (spool.root / rel).exists()
    assert list(spool.iter_files()) == []


def test_spool_creates_its_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "spool", tmp_path / "a" / "quarantine")
    assert spool.root.is_dir() and spool.tmp.is_dir() and spool.quarantine.is_dir()
    assert os.path.samefile(spool.tmp.parent, spool.root)
