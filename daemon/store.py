"""Durable storage of one instance: file in the spool and rows in the database, both or neither.

Order (the answer 0x0000 may only follow a full success): write + fsync a temp file (hashing it on the way); rename
into place + fsync the folder; insert study/series/instance/job in one transaction. If the transaction fails the
renamed file is removed. A crash between rename and commit leaves a file without rows, which
:func:`daemon.recovery.reindex` adopts (through :func:`adopt`, which applies the identity checks too).

Patient identity (README "Patient identity conflicts"): an instance whose StudyInstanceUID belongs to another
patient fingerprint, whose SeriesInstanceUID belongs to another study, or whose SOP Instance UID is stored with
other content is held: its bytes move to the quarantine beside a reason file, an ``identity_conflicts`` row and an
audit event record it, and nothing of the existing study refers to it.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from daemon.identity import IdentityKey, fingerprint_difference
from daemon.intake import InstanceMeta
from daemon.spool import Payload, Spool, SpooledFile
from daemon.tables import AuditEvent, ConflictKind, IdentityConflict, Instance, Job, JobState, Series, Study

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # the same SOP Instance UID with the same dataset: nothing new
    CONFLICT = "conflict"  # held back in the quarantine with an identity_conflicts row (never merged)


class IdentityConflictError(ValueError):
    """Storing the instance would mix patients, studies or contents; ``reason`` names attributes, never values."""

    def __init__(self, kind: ConflictKind, reason: str) -> None:
        super().__init__(kind, reason)
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def study_conflict(stored_fingerprint: str | None, fingerprint: str) -> IdentityConflictError | None:
    """A study whose patient fingerprint is ``stored_fingerprint`` (None: not yet known) and an image with
    ``fingerprint``: the conflict, or None when they may be merged."""
    if stored_fingerprint is None:
        return None
    difference = fingerprint_difference(stored_fingerprint, fingerprint)
    if difference is None:
        return None
    return IdentityConflictError(
        ConflictKind.STUDY, f"StudyInstanceUID already belongs to another patient ({difference})"
    )


def series_conflict(series_study_uid: str | None, study_uid: str) -> IdentityConflictError | None:
    if series_study_uid is None or series_study_uid == study_uid:
        return None
    return IdentityConflictError(
        ConflictKind.SERIES,
        f"SeriesInstanceUID already belongs to another study ({series_study_uid}; StudyInstanceUID differs)",
    )


def find_conflict(session: Session, meta: InstanceMeta, fingerprint: str) -> IdentityConflictError | None:
    """Read-only check of a new instance against the stored study and series (no locks): the fast answer before its
    file is moved into the spool. :func:`record_instance` repeats it authoritatively inside its transaction."""
    study = session.execute(
        select(Study.patient_fingerprint).where(Study.study_instance_uid == meta.study_instance_uid)
    ).first()
    conflict = study_conflict(study[0], fingerprint) if study is not None else None
    if conflict is not None:
        return conflict
    series_study = session.scalar(
        select(Study.study_instance_uid)
        .join(Series, Series.study_id == Study.id)
        .where(Series.series_instance_uid == meta.series_instance_uid)
    )
    return series_conflict(series_study, meta.study_instance_uid)


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def record_instance(
    session: Session,
    meta: InstanceMeta,
    spooled: SpooledFile,
    calling_ae: str | None,
    *,
    fingerprint: str,
    sha256: str | None = None,
) -> Instance:
    """Add study, series (if new), instance and its job to ``session`` (no commit). Job is SKIPPED when gated.

    The study is created with ``fingerprint`` (daemon.identity) or, if it exists, must carry the same one; the series
    must belong to this study. Concurrent senders of one new Study UID both insert-or-ignore, then compare what was
    stored, so exactly one patient owns it. Raises IdentityConflictError (roll the session back) otherwise."""
    insert = _insert(session)
    session.execute(
        insert(Study)
        .values(
            study_instance_uid=meta.study_instance_uid, study_date=meta.study_date, patient_fingerprint=fingerprint
        )
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    study_id, stored = session.execute(
        select(Study.id, Study.patient_fingerprint).where(Study.study_instance_uid == meta.study_instance_uid)
    ).one()
    if stored is None:  # a study stored before fingerprints existed: the first image after the upgrade claims it
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.patient_fingerprint.is_(None))
            .values(patient_fingerprint=fingerprint)
        )
        stored = session.scalar(select(Study.patient_fingerprint).where(Study.id == study_id))
    conflict = study_conflict(stored, fingerprint)
    if conflict is not None:
        raise conflict
    session.execute(
        insert(Series)
        .values(series_instance_uid=meta.series_instance_uid, study_id=study_id, modality=meta.modality)
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
    )
    series_id, series_study_id = session.execute(
        select(Series.id, Series.study_id).where(Series.series_instance_uid == meta.series_instance_uid)
    ).one()
    if series_study_id != study_id:
        owner = session.scalar(select(Study.study_instance_uid).where(Study.id == series_study_id))
        conflict = series_conflict(owner, meta.study_instance_uid)
        assert conflict is not None
        raise conflict
    instance = Instance(
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        series_id=series_id,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        path=spooled.relative_path,
        size_bytes=spooled.size_bytes,
        sha256=sha256,
        calling_ae=calling_ae,
        modality=meta.modality,
        body_part=meta.body_part,
        view_position=meta.view_position,
        skip_reason=meta.skip_reason,
    )
    session.add(instance)
    session.flush()
    state = JobState.SKIPPED if meta.skip_reason else JobState.QUEUED
    session.add(Job(instance_id=instance.id, state=state, error=meta.skip_reason))
    return instance


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part 10 file's dataset, without preamble and file meta (which name the sending AE and the
    receiving implementation): a resend of the same dataset from another AE has the same digest. A file without a
    readable file meta group is hashed whole."""
    data = path.read_bytes()
    start = 0
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL":
        start = 144 + int.from_bytes(data[140:144], "little")
    return hashlib.sha256(memoryview(data)[start:]).hexdigest()


def hold(
    spool: Spool,
    sessions: sessionmaker[Session],
    source: Path,
    meta: InstanceMeta,
    conflict: IdentityConflictError,
    *,
    fingerprint: str,
    sha256: str,
    calling_ae: str | None,
    keep_on_failure: bool = False,
) -> Path:
    """Move ``source`` (a fsynced file of the spool) into the quarantine with its reason, then record the conflict and
    its audit event in one transaction. If that transaction fails the quarantined file is removed again (the sender
    was not acknowledged and will resend) unless ``keep_on_failure``; the error is raised."""
    size = source.stat().st_size
    target = spool.quarantine_file(
        source,
        f"identity conflict ({conflict.kind.value}): {conflict.reason}; SOPInstanceUID={meta.sop_instance_uid} "
        f"StudyInstanceUID={meta.study_instance_uid} SeriesInstanceUID={meta.series_instance_uid}",
    )
    try:
        with sessions.begin() as session:
            session.add(
                IdentityConflict(
                    kind=conflict.kind,
                    sop_instance_uid=meta.sop_instance_uid,
                    sop_class_uid=meta.sop_class_uid,
                    study_instance_uid=meta.study_instance_uid,
                    series_instance_uid=meta.series_instance_uid,
                    reason=conflict.reason,
                    path=target.name,
                    sha256=sha256,
                    size_bytes=size,
                    patient_fingerprint=fingerprint,
                    calling_ae=calling_ae,
                )
            )
            session.add(
                AuditEvent(
                    event="identity_conflict",
                    calling_ae=calling_ae,
                    sop_instance_uid=meta.sop_instance_uid,
                    detail=f"{conflict.kind.value}: {conflict.reason}; study {meta.study_instance_uid}; "
                    f"kept as {target.name}",
                )
            )
    except BaseException:
        if not keep_on_failure:
            target.unlink(missing_ok=True)
            target.with_name(target.name.removesuffix(".dcm") + ".reason.txt").unlink(missing_ok=True)
        raise
    log.warning(
        "identity conflict: instance held, not merged sop_instance_uid=%s study_instance_uid=%s kind=%s: %s",
        meta.sop_instance_uid,
        meta.study_instance_uid,
        conflict.kind.value,
        conflict.reason,
    )
    return target


def adopt(spool: Spool, sessions: sessionmaker[Session], meta: InstanceMeta, spooled: SpooledFile) -> StoreOutcome:
    """Start-up re-index of a spool file without rows (a crash between rename and commit): record it like a new
    store, or, when it conflicts with what was stored since, move it to the quarantine and record the conflict.
    Raises IntegrityError when its SOP Instance UID is already recorded (under another path)."""
    fingerprint = IdentityKey.for_data_dir(spool.root.parent).fingerprint(meta.identity)
    sha256 = hashlib.sha256(spooled.absolute_path.read_bytes()).hexdigest()
    try:
        with sessions.begin() as session:
            record_instance(session, meta, spooled, None, fingerprint=fingerprint, sha256=sha256)
    except IdentityConflictError as conflict:
        hold(spool, sessions, spooled.absolute_path, meta, conflict, fingerprint=fingerprint, sha256=sha256,
             calling_ae=None, keep_on_failure=True)
        return StoreOutcome.CONFLICT
    return StoreOutcome.STORED


class InstanceStore:
    """Stores instances durably. Thread-safe: concurrent stores of one SOP Instance UID are serialised.

    Identity (daemon.identity): an instance is never merged into a study of another patient, a series of another
    study, or over a stored instance with other content; it is held (StoreOutcome.CONFLICT, see :func:`hold`).
    ``key`` defaults to ``<data_dir>/identity.key`` with the data dir the spool root's parent."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session], key: IdentityKey | None = None) -> None:
        self.spool = spool
        self.sessions = sessions
        self.key = key or IdentityKey.for_data_dir(spool.root.parent)
        self._locks = [threading.Lock() for _ in range(64)]

    def _lock(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % len(self._locks)]

    def exists(self, sop_instance_uid: str) -> bool:
        with self.sessions() as session:
            return (
                session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
                is not None
            )

    def _sop_conflict(self, tmp: Path, sha256: str, fingerprint: str, existing: tuple) -> IdentityConflictError | None:
        """None when the resent file holds the stored dataset (same file, or the same dataset behind another file
        meta header), else the SOP conflict with whether the patient differs too."""
        path, stored_sha256, study_fingerprint = existing
        if stored_sha256 == sha256:
            return None
        try:
            if dataset_sha256(self.spool.path_of(path)) == dataset_sha256(tmp):
                return None
        except OSError:
            pass  # the stored file is gone: the resend cannot be compared, so it is held
        if study_fingerprint is None:
            detail = "sha256 differs"
        else:
            patient = fingerprint_difference(study_fingerprint, fingerprint)
            detail = f"sha256 differs; {'another patient: ' + patient if patient else 'same patient'}"
        reason = f"SOPInstanceUID already stored with different content ({detail})"
        return IdentityConflictError(ConflictKind.SOP, reason)

    def save(
        self,
        meta: InstanceMeta,
        data: Payload,
        calling_ae: str | None,
        *,
        after_commit: Callable[[], None] | None = None,
    ) -> StoreOutcome:
        """Store ``data`` (the complete DICOM file: bytes or chunks). Raises OSError (disk, reserve) or SQLAlchemyError
        (database) with nothing left behind. A known SOP Instance UID with the same dataset returns DUPLICATE and
        changes nothing; an identity conflict returns CONFLICT with the bytes held in the quarantine (both are
        acknowledged by the SCP: the bytes are safe)."""
        uid = meta.sop_instance_uid
        rel = self.spool.relative_path(meta.study_instance_uid, meta.series_instance_uid, uid)
        fingerprint = self.key.fingerprint(meta.identity)
        digest = hashlib.sha256()
        tmp = self.spool.write_temp(data, digest=digest)
        sha256 = digest.hexdigest()
        with self._lock(uid):
            try:
                with self.sessions() as session:
                    existing = session.execute(
                        select(Instance.path, Instance.sha256, Study.patient_fingerprint)
                        .join(Series, Instance.series_id == Series.id)
                        .join(Study, Series.study_id == Study.id)
                        .where(Instance.sop_instance_uid == uid)
                    ).first()
                    if existing is not None:
                        conflict = self._sop_conflict(tmp, sha256, fingerprint, tuple(existing))
                        if conflict is None:
                            self.spool.discard(tmp)
                            return StoreOutcome.DUPLICATE
                    else:
                        conflict = find_conflict(session, meta, fingerprint)
                if conflict is not None:
                    hold(self.spool, self.sessions, tmp, meta, conflict, fingerprint=fingerprint, sha256=sha256,
                         calling_ae=calling_ae)
                    return StoreOutcome.CONFLICT
            except BaseException:
                self.spool.discard(tmp)
                raise
            spooled = self.spool.commit(tmp, rel)
            try:
                with self.sessions.begin() as session:
                    record_instance(session, meta, spooled, calling_ae, fingerprint=fingerprint, sha256=sha256)
            except IdentityConflictError as conflict:  # another sender won the study or series since the check
                try:
                    hold(self.spool, self.sessions, spooled.absolute_path, meta, conflict, fingerprint=fingerprint,
                         sha256=sha256, calling_ae=calling_ae)
                except BaseException:
                    self.spool.remove(rel)
                    raise
                return StoreOutcome.CONFLICT
            except BaseException:
                self.spool.remove(rel)
                raise
        log.info("instance stored sop_instance_uid=%s skipped=%s", uid, bool(meta.skip_reason))
        if after_commit is not None:
            after_commit()
        return StoreOutcome.STORED


def audit(
    sessions: sessionmaker[Session],
    event: str,
    *,
    calling_ae: str | None = None,
    called_ae: str | None = None,
    peer_address: str | None = None,
    sop_instance_uid: str | None = None,
    detail: str | None = None,
) -> None:
    """Append one audit event; failures are logged, never raised (auditing must not break the network edge)."""
    try:
        with sessions.begin() as session:
            session.add(
                AuditEvent(
                    event=event,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_address=peer_address,
                    sop_instance_uid=sop_instance_uid,
                    detail=detail,
                )
            )
    except Exception:
        log.exception("could not write audit event %s", event)
