"""Patient identity without storing it: who an image belongs to, as a keyed fingerprint the database can compare.

The database keeps no patient names or IDs (daemon.store.tables). To tell whether two images of one StudyInstanceUID
belong to one patient it keeps, per study, a *fingerprint*: HMAC-SHA256 under a per-installation secret of the
normalised identity of the study's first image. Without the secret (``<data_dir>/identity.key``, 32 random bytes
as hex, created mode 0600 on first use and never logged) a database dump cannot be turned back into patient IDs by
trying likely ones. Nodes that share one database need the same key file (copy it); fingerprints carry the key's
id so a mismatch is named in the conflict reason instead of looking like another patient.

Identity of one image (PS3.3 C.7.1.1 Patient Module), in order:
1. ``id``: (IssuerOfPatientID, PatientID) when PatientID is not empty;
2. ``nm``: (PatientName, PatientBirthDate) when PatientID is empty and either of them is not;
3. ``none``: no identity at all. Such images are only merged with other images without identity.
Normalisation is deliberately minimal (padding and NULs stripped; names upper-cased with whitespace collapsed and
empty trailing components dropped): a difference that normalisation does not remove is treated as another patient
and held, never merged. The fingerprint text is ``<basis>:<key id>:<hmac hex>``, or ``none``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydicom import Dataset

from daemon.errors import DaemonError

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
NO_IDENTITY = "none"
FINGERPRINT_LENGTH = 80  # column width; "id:" + 8 + ":" + 64 = 76
_BASIS_TEXT = {"id": "PatientID", "nm": "PatientName/PatientBirthDate", NO_IDENTITY: "no patient identity"}


class IdentityKeyError(DaemonError, OSError):
    """The identity key file cannot be created or read, or does not hold 64 hex digits."""


class MixedPatientsError(DaemonError, ValueError):
    """Images that must belong to one patient do not (the report-assembly guard)."""


def _strip(value: object) -> str:
    return "" if value is None else str(value).strip(" \x00\t\r\n")


def _normalise_name(value: object) -> str:
    """PN: per component group (alphabetic=ideographic=phonetic), components upper-cased, inner whitespace collapsed,
    empty trailing components and groups dropped."""
    text = unicodedata.normalize("NFC", _strip(value))
    groups = []
    for group in text.split("="):
        parts = [" ".join(part.split()).upper() for part in group.split("^")]
        while parts and not parts[-1]:
            parts.pop()
        groups.append("^".join(parts))
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


class PatientIdentity:
    """The normalised identity of one image. Holds patient data in memory only: ``repr`` shows the basis, never
    the values; never log or store the values (store :meth:`IdentityKey.fingerprint` instead)."""

    __slots__ = ("basis", "_values")

    def __init__(self, basis: str, values: tuple[str, str]) -> None:
        if basis not in _BASIS_TEXT:
            raise ValueError(f"Invalid identity basis {basis!r} - expected one of {sorted(_BASIS_TEXT)}")
        self.basis = basis
        self._values = values

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PatientIdentity:
        """Read (IssuerOfPatientID, PatientID), else (PatientName, PatientBirthDate), else no identity."""
        patient_id = _strip(ds.get("PatientID"))
        if patient_id:
            return cls("id", (_strip(ds.get("IssuerOfPatientID")), patient_id))
        name = _normalise_name(ds.get("PatientName"))
        birth_date = _strip(ds.get("PatientBirthDate"))[:8]
        if name or birth_date:
            return cls("nm", (name, birth_date))
        return cls(NO_IDENTITY, ("", ""))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientIdentity) and (self.basis, self._values) == (other.basis, other._values)

    def __hash__(self) -> int:
        return hash((self.basis, self._values))

    def __repr__(self) -> str:
        return f"PatientIdentity(basis={self.basis!r})"

    def message(self) -> bytes:
        """The HMAC input: basis and values joined by NUL (UTF-8)."""
        return "\x00".join((self.basis, *self._values)).encode("utf-8")


def describe_difference(old_basis: str, new_basis: str) -> str:
    """Why two identities differ, naming attributes only (no values): the parenthesis of a conflict reason."""
    if old_basis == new_basis == "id":
        return "PatientID differs"
    if old_basis == new_basis == "nm":
        return "no PatientID; PatientName/PatientBirthDate differ"
    if new_basis == NO_IDENTITY:
        return f"this image has no patient identity; the study's images have {_BASIS_TEXT[old_basis]}"
    if old_basis == NO_IDENTITY:
        return f"the study's images have no patient identity; this image has {_BASIS_TEXT[new_basis]}"
    return f"the study's images are identified by {_BASIS_TEXT[old_basis]}, this image by {_BASIS_TEXT[new_basis]}"


def fingerprint_difference(stored: str, new: str) -> str | None:
    """None when ``stored`` and ``new`` name the same patient, else why not (attributes only, no values)."""
    if stored == new:
        return None
    old_basis, _, old_rest = stored.partition(":")
    new_basis, _, new_rest = new.partition(":")
    if old_basis == new_basis and old_basis != NO_IDENTITY and old_rest[:8] != new_rest[:8]:
        return (
            "fingerprints made with another identity key - every node sharing a database needs the same "
            f"{KEY_FILE}"
        )
    return describe_difference(old_basis, new_basis)


def check_one_patient(images: Sequence[tuple[str, Dataset]]) -> None:
    """The report-assembly guard: every (SOP Instance UID, dataset) must have the same StudyInstanceUID and the same
    patient identity as the first. Raises MixedPatientsError naming the UIDs and attributes (never the values)."""
    if not images:
        return
    first_uid, first = images[0]
    identity = PatientIdentity.from_dataset(first)
    study = _strip(first.get("StudyInstanceUID"))
    for uid, ds in images[1:]:
        other = PatientIdentity.from_dataset(ds)
        if other != identity:
            raise MixedPatientsError(
                f"images of one report belong to different patients: {uid} vs {first_uid} "
                f"({describe_difference(identity.basis, other.basis)}) - report not written"
            )
        if _strip(ds.get("StudyInstanceUID")) != study:
            raise MixedPatientsError(
                f"images of one report belong to different studies: {uid} vs {first_uid} "
                "(StudyInstanceUID differs) - report not written"
            )


class IdentityKey:
    """The per-installation HMAC key in ``path`` (created 0600 with 32 random bytes on first use)."""

    _cache: ClassVar[dict[Path, IdentityKey]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError(f"Invalid identity key: {len(secret)} bytes - at least 32 needed")
        self._secret = secret
        self.key_id = hashlib.sha256(b"chexd identity key id\x00" + secret).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"IdentityKey(key_id={self.key_id!r})"

    @classmethod
    def load(cls, path: Path) -> IdentityKey:
        """Read ``path``, creating it (0600, fsynced) when missing; cached per path. Raises IdentityKeyError."""
        path = path.resolve()
        with cls._cache_lock:
            if path in cls._cache:
                return cls._cache[path]
            key = cls(_read_or_create(path))
            cls._cache[path] = key
            return key

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> IdentityKey:
        return cls.load(data_dir / KEY_FILE)

    def fingerprint(self, identity: PatientIdentity | None) -> str:
        """``<basis>:<key id>:<HMAC-SHA256 hex>``, or ``none`` for an image without identity (or None)."""
        if identity is None or identity.basis == NO_IDENTITY:
            return NO_IDENTITY
        digest = hmac.new(self._secret, identity.message(), hashlib.sha256).hexdigest()
        return f"{identity.basis}:{self.key_id}:{digest}"


def _read_or_create(path: Path) -> bytes:
    try:
        if not path.exists():
            _create(path)
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode & 0o077
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityKeyError(f"identity key {path}: cannot be created or read: {exc}") from exc
    if mode:
        log.warning("identity key %s is readable by group or others (mode %o) - chmod 600 it", path, mode)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise IdentityKeyError(
            f"identity key {path}: holds {len(text)} characters - expected 64 hex digits; restore it from a backup "
            "(a new key makes every existing study look like another patient's)"
        )
    return secret


def _create(path: Path) -> None:
    """Write a new key to a temp file (0600, fsynced), then hard-link it into place: another process creating the
    key at the same moment either wins or loses whole, nobody reads a half-written key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("created identity key %s (mode 0600)", path)
