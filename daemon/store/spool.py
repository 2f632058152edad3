"""The spool: received DICOM files on disk, written durably and addressed only by validated UIDs.

Layout under the spool root: ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; partial writes live
in ``.tmp/`` on the same file system so the final rename is atomic. ``quarantine/`` (beside the spool) keeps raw
bytes that could not be parsed, with a ``.reason.txt`` next to each.

The disk reserve (``disk_reserve_mb``) is checked in one place, :class:`DiskGuard`, by every writer: the spool and
quarantine here, prediction archives and report documents (daemon.work.reports). Background loops wait while the disk is
below it through :class:`DiskPause`, which logs one line per change of state.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.errors import DaemonError

log = logging.getLogger(__name__)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_DIR = ".tmp"
SUFFIX = ".dcm"
_PART = ".part"  # an unfinished quarantine file (removed at start-up)


Payload = bytes | memoryview | Sequence[bytes | memoryview]


def as_chunks(data: Payload) -> Sequence[bytes | memoryview]:
    return [data] if isinstance(data, bytes | memoryview) else data


class InvalidUIDError(DaemonError, ValueError):
    """A UID is not digits and dots, is longer than 64 characters, or has an empty or zero-padded component."""


class DiskReserveError(DaemonError, OSError):
    """Writing would leave less free space than the configured reserve (errno ENOSPC, so callers that handle a full
    disk handle this the same way)."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"
_PG_DISK_FULL = "53100"  # PostgreSQL SQLSTATE disk_full


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) means the disk is full or below the reserve:
    DiskReserveError, an OSError with ENOSPC/EDQUOT, SQLite's "database or disk is full", PostgreSQL's disk_full.
    Database errors are recognised through SQLAlchemy's ``orig`` attribute as well."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        orig = getattr(exc, "orig", None)
        for candidate in (exc, orig):
            if candidate is None:
                continue
            if getattr(candidate, "sqlite_errorcode", None) == _SQLITE_FULL:
                return True
            if getattr(candidate, "sqlstate", None) == _PG_DISK_FULL:
                return True
            if "database or disk is full" in str(candidate) or "No space left on device" in str(candidate):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class DiskGuard:
    """The disk reserve: every writer calls :meth:`check` before it writes. ``reserve_bytes`` in bytes (0: none).

    The reserve is per file system: free space is measured where the file goes (its nearest existing folder)."""

    def __init__(self, reserve_bytes: int = 0) -> None:
        if reserve_bytes < 0:
            raise ValueError(f"Invalid reserve_bytes {reserve_bytes} - must be >= 0")
        self.reserve_bytes = reserve_bytes

    def free_bytes(self, path: Path) -> int:
        """Free bytes (for unprivileged writers) on the file system holding ``path``."""
        return shutil.disk_usage(_existing(Path(path))).free

    def check(self, path: Path, incoming_bytes: int = 0) -> None:
        """Raise DiskReserveError when writing ``incoming_bytes`` under ``path`` would leave less than the reserve."""
        free = self.free_bytes(path)
        if free - incoming_bytes < self.reserve_bytes:
            raise DiskReserveError(
                errno.ENOSPC,
                f"free disk {free // 2**20} MiB minus {incoming_bytes} bytes is below the reserve of "
                f"{self.reserve_bytes // 2**20} MiB (disk_reserve_mb)",
            )

    def below_reserve(self, path: Path, incoming_bytes: int = 0) -> bool:
        return self.free_bytes(path) - incoming_bytes < self.reserve_bytes


DISK_FULL_RESUME_MARGIN = 16 * 2**20  # after a disk-full error, wait until this much more is free (bytes)
DISK_FULL_RETRY_SECONDS = 60.0  # ... or until this long has passed, then try once more


class DiskPause:
    """One background activity's view of the disk (``what``: "jobs", "reports", "forwards"), shared by its threads.

    :meth:`blocked` is True while free space under ``path`` is below the reserve, and after :meth:`hit` (a write failed
    because the disk is full) until :data:`DISK_FULL_RESUME_MARGIN` more than then is free (and at least the
    reserve), or :data:`DISK_FULL_RETRY_SECONDS` have passed. Each change of state is logged once ("disk below
    reserve: reports paused (...)", "disk space back: reports resumed (...)"); the loop waits instead of failing or
    retrying its work, so a full disk never makes a log line per try."""

    def __init__(self, guard: DiskGuard, path: Path, what: str) -> None:
        self.guard = guard
        self.path = Path(path)
        self.what = what
        self._lock = threading.Lock()
        self._paused = False
        self._after_error = False
        self._free_at_error = 0
        self._error_at = 0.0

    @property
    def paused(self) -> bool:
        return self._paused

    def blocked(self) -> bool:
        """Check free space now; log a change of state and return whether the activity must wait."""
        try:
            free = self.guard.free_bytes(self.path)
        except OSError:
            return self._paused
        reserve = self.guard.reserve_bytes
        with self._lock:
            if free < reserve:
                if not self._paused:
                    self._paused = True
                    log.warning(
                        "disk below reserve: %s paused (free %d MiB < reserve %d MiB)",
                        self.what,
                        free // 2**20,
                        reserve // 2**20,
                    )
                return True
            if self._after_error:
                need = max(reserve, self._free_at_error) + DISK_FULL_RESUME_MARGIN
                if free < need and time.monotonic() - self._error_at < DISK_FULL_RETRY_SECONDS:
                    return True
                self._after_error = False
                if free < need:
                    self._paused = False
                    log.warning("disk still full? %s try again (free %d MiB)", self.what, free // 2**20)
                    return False
            if self._paused:
                self._paused = False
                log.warning("disk space back: %s resumed (free %d MiB)", self.what, free // 2**20)
            return False

    def hit(self, exc: BaseException) -> None:
        """A write failed because the disk is full: pause until space returns (one log line per pause)."""
        try:
            free = self.guard.free_bytes(self.path)
        except OSError:
            free = 0
        with self._lock:
            self._after_error = True
            self._free_at_error = free
            self._error_at = time.monotonic()
            if not self._paused:
                self._paused = True
                log.warning("disk full: %s paused until space returns (%s)", self.what, _short(exc))


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"


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

    def __init__(self, root: Path, quarantine: Path, reserve_bytes: int = 0, *, guard: DiskGuard | None = None) -> None:
        self.root = root.resolve()
        self.quarantine = quarantine.resolve()
        self.guard = guard or DiskGuard(reserve_bytes)
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

    @property
    def reserve_bytes(self) -> int:
        return self.guard.reserve_bytes

    @reserve_bytes.setter
    def reserve_bytes(self, value: int) -> None:
        self.guard.reserve_bytes = value

    def check_reserve(self, incoming_bytes: int) -> None:
        """Raise DiskReserveError when ``incoming_bytes`` more in the spool would go below the reserve."""
        self.guard.check(self.root, incoming_bytes)

    def write_temp(self, data: Payload, *, digest: Any = None) -> Path:
        """Write ``data`` (bytes, or a sequence of byte chunks written in order) to a new temp file and fsync it.
        ``digest`` (a hashlib object, optional) is updated with every chunk as it is written (no second pass).
        On any failure the temp file is removed."""
        chunks = as_chunks(data)
        self.check_reserve(sum(len(c) for c in chunks))
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb", buffering=0) as fh:
                for chunk in chunks:
                    view = memoryview(chunk)
                    if digest is not None:
                        digest.update(view)
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
        """Delete every partial write left by a crash (spool temp files, unfinished quarantine files); return how
        many were removed."""
        count = 0
        for folder, pattern in ((self.tmp, "*"), (self.quarantine, "*" + _PART)):
            removed = 0
            for path in folder.glob(pattern):
                path.unlink(missing_ok=True)
                removed += 1
            if removed:
                fsync_dir(folder)
            count += removed
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
        """Keep unparseable bytes with their reason; returns the data file's path.

        Both files are written under temporary names, fsynced, then renamed reason first: a ``.bin`` never exists
        without its ``.reason.txt``, and a failure (disk full) leaves neither. Raises DiskReserveError when the
        bytes would take the disk below the reserve (nothing is written), OSError for other write failures."""
        chunks = as_chunks(data)
        reason_bytes = (reason + "\n").encode("utf-8")
        self.guard.check(self.quarantine, sum(len(c) for c in chunks) + len(reason_bytes))
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        base = self.quarantine / f"{stamp}-{uuid.uuid4().hex[:12]}"
        data_path, reason_path = base.with_suffix(".bin"), base.with_suffix(".reason.txt")
        parts = [Path(str(reason_path) + _PART), Path(str(data_path) + _PART)]
        renamed: list[Path] = []
        try:
            for part, content in zip(parts, ([reason_bytes], chunks), strict=True):
                with open(part, "xb", buffering=0) as fh:
                    for chunk in content:
                        view = memoryview(chunk)
                        while view:
                            view = view[fh.write(view) :]
                    os.fsync(fh.fileno())
            for part, final in zip(parts, (reason_path, data_path), strict=True):
                os.replace(part, final)
                renamed.append(final)
            fsync_dir(self.quarantine)
        except BaseException:
            for path in (*parts, *renamed):
                path.unlink(missing_ok=True)
            raise
        return data_path

    def quarantine_file(self, source: Path, reason: str) -> Path:
        """Move a fsynced file of this spool (a temp file or a stored one) into the quarantine as ``<stamp>-<id>.dcm``
        beside ``<stamp>-<id>.reason.txt`` (both fsynced); returns the new path. The move is a rename: it needs no
        free space. Used for images held back by an identity conflict (daemon.store.instances)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        base = f"{stamp}-{uuid.uuid4().hex[:12]}"
        reason_path = self.quarantine / f"{base}.reason.txt"
        with open(reason_path, "x", encoding="utf-8") as fh:
            fh.write(reason + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        target = self.quarantine / f"{base}{SUFFIX}"
        try:
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copyfile(source, target)  # spool and quarantine on different file systems
                with open(target, "rb") as fh:
                    os.fsync(fh.fileno())
                source.unlink()
        except BaseException:
            if source.exists():  # nothing moved, or a partial copy: the source is still the one copy
                target.unlink(missing_ok=True)
            reason_path.unlink(missing_ok=True)
            raise
        fsync_dir(self.quarantine)
        fsync_dir(source.parent)
        return target

    def free_bytes(self) -> int:
        return self.guard.free_bytes(self.root)
