"""The spool: received DICOM files on disk, written durably and addressed only by validated UIDs.

Layout under the spool root: ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; partial writes live
in ``.tmp/`` on the same file system so the final rename is atomic. ``quarantine/`` (beside the spool) keeps raw
bytes that could not be parsed, with a ``.reason.txt`` next to each.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_DIR = ".tmp"
SUFFIX = ".dcm"


Payload = bytes | memoryview | Sequence[bytes | memoryview]


def as_chunks(data: Payload) -> Sequence[bytes | memoryview]:
    return [data] if isinstance(data, bytes | memoryview) else data


class InvalidUIDError(ValueError):
    """A UID is not digits and dots, is longer than 64 characters, or has an empty or zero-padded component."""


class DiskReserveError(OSError):
    """Writing would leave less free space than the configured reserve."""


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string or raise InvalidUIDError naming the attribute (PS3.5 9.1)."""
    text = "" if value is None else str(value)
    text = text.rstrip("\x00 ")
    if not text:
        raise InvalidUIDError(f"{name} is missing")
    if len(text) > 64:
        raise InvalidUIDError(f"{name} {text[:80]!r} is {len(text)} characters - at most 64 allowed")
    if not _UID.match(text):
        raise InvalidUIDError(
            f"{name} {text[:80]!r} is not a valid UID - only digits and dots, no leading zeros"
        )
    return text


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, kw_only=True, slots=True)
class SpooledFile:
    """A file durably in the spool. ``relative_path`` is relative to the spool root; ``size_bytes`` in bytes."""

    relative_path: str
    absolute_path: Path
    size_bytes: int


class Spool:
    """Durable file store under ``root``. Every method either completes or leaves no file behind."""

    def __init__(self, root: Path, quarantine: Path, reserve_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.quarantine = quarantine.resolve()
        self.reserve_bytes = reserve_bytes
        self.tmp = self.root / TMP_DIR
        for folder in (self.root, self.tmp, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Spool-relative path for validated UIDs; raises InvalidUIDError for anything else."""
        parts = [
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_uid, "SOPInstanceUID") + SUFFIX,
        ]
        rel = "/".join(parts)
        if (
            not (self.root / rel).resolve().is_relative_to(self.root)
        ):  # defence in depth; UIDs cannot contain '/'
            raise InvalidUIDError(f"path {rel!r} would leave the spool")
        return rel

    def path_of(self, relative_path: str) -> Path:
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root) or path.is_relative_to(self.tmp):
            raise InvalidUIDError(f"path {relative_path!r} is outside the spool")
        return path

    def check_reserve(self, incoming_bytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.reserve_bytes:
            raise DiskReserveError(
                f"free disk {free // 2**20} MiB minus {incoming_bytes} bytes is below the reserve of "
                f"{self.reserve_bytes // 2**20} MiB"
            )

    def write_temp(self, data: Payload) -> Path:
        """Write ``data`` (bytes, or a sequence of byte chunks written in order) to a new temp file and fsync it.
        On any failure the temp file is removed."""
        chunks = as_chunks(data)
        self.check_reserve(sum(len(c) for c in chunks))
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb", buffering=0) as fh:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[fh.write(view) :]
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def commit(self, tmp: Path, relative_path: str) -> SpooledFile:
        """Atomically move a fsynced temp file to ``relative_path`` and fsync the folders that changed."""
        final = self.path_of(relative_path)
        try:
            created = self._make_parents(final.parent)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            for folder in created:
                fsync_dir(folder.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return SpooledFile(relative_path=relative_path, absolute_path=final, size_bytes=final.stat().st_size)

    def _make_parents(self, folder: Path) -> list[Path]:
        created: list[Path] = []
        current = folder
        while not current.exists():
            created.append(current)
            current = current.parent
        for path in reversed(created):
            path.mkdir(exist_ok=True)
        return created

    def remove(self, relative_path: str) -> None:
        path = self.path_of(relative_path)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def remove_stale_temp_files(self) -> int:
        """Delete every partial write left by a crash; return how many were removed."""
        count = 0
        for path in self.tmp.iterdir():
            path.unlink(missing_ok=True)
            count += 1
        if count:
            fsync_dir(self.tmp)
        return count

    def iter_files(self) -> Iterator[str]:
        """Spool-relative paths of every stored file (temp files excluded)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root and TMP_DIR in dirnames:
                dirnames.remove(TMP_DIR)
            for name in filenames:
                if name.endswith(SUFFIX):
                    yield Path(dirpath, name).relative_to(self.root).as_posix()

    def quarantine_bytes(self, data: Payload, reason: str) -> Path:
        """Keep unparseable bytes with their reason; returns the data file's path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        base = self.quarantine / f"{stamp}-{uuid.uuid4().hex[:12]}"
        data_path = base.with_suffix(".bin")
        with open(data_path, "xb") as fh:
            for chunk in as_chunks(data):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        base.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        fsync_dir(self.quarantine)
        return data_path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
