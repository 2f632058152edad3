"""Durable storage of one instance: file in the spool and rows in the database, both or neither.

Order (the answer 0x0000 may only follow a full success): write + fsync a temp file (hashing it on the way); then ONE
transaction on one connection: duplicate look-up, identity checks and study/series/instance/job inserts; rename the
file into place + fsync the folder; commit. If the commit fails the renamed file is removed. A crash between rename
and commit leaves a file without rows, which :func:`daemon.store.recovery.reindex` adopts (through :func:`adopt`, which
applies the identity checks too).

Speed (bench/README.md "store_throughput"): the hot path runs pre-built Core statements on the session's connection
(no ORM unit of work): duplicate look-up, one read of the series with its study (the next image of a known series
needs no study/series insert), instance and job inserts, commit: four statements and one WAL fsync per image.

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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.intake import InstanceMeta
from daemon.errors import DaemonError
from daemon.store.identity import IdentityKey, fingerprint_difference
from daemon.store.spool import Payload, Spool, SpooledFile, as_chunks
from daemon.store.tables import AuditEvent, ConflictKind, IdentityConflict, Instance, Job, JobState, Series, Study

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # the same SOP Instance UID with the same dataset: nothing new
    CONFLICT = "conflict"  # held back in the quarantine with an identity_conflicts row (never merged)


class IdentityConflictError(DaemonError, ValueError):
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


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# Pre-built statements of the hot path (SQLAlchemy caches their compiled form; building them per call costs more than
# running them). Python-side column defaults (timestamps, job kind/attempts) apply to these Core inserts as well.
_INSERT_INSTANCE = insert(Instance)
_INSERT_JOB = insert(Job)
_SELECT_STORED = (
    select(Instance.path, Instance.sha256, Study.patient_fingerprint)
    .join(Series, Instance.series_id == Series.id)
    .join(Study, Series.study_id == Study.id)
    .where(Instance.sop_instance_uid == bindparam("uid"))
)
_SELECT_SERIES = (  # the next image of a known series: one read answers both identity checks
    select(Series.id, Series.study_id, Study.study_instance_uid, Study.patient_fingerprint)
    .join(Study, Series.study_id == Study.id)
    .where(Series.series_instance_uid == bindparam("uid"))
)


def _study_id(session: Session, meta: InstanceMeta, fingerprint: str) -> int:
    """Insert-or-ignore the study, then check that it carries ``fingerprint``; raises IdentityConflictError."""
    insert_or_ignore = _insert(session)
    session.execute(
        insert_or_ignore(Study)
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
    return int(study_id)


def _series_id(session: Session, meta: InstanceMeta, study_id: int) -> int:
    """Insert-or-ignore the series, then check that it belongs to ``study_id``; raises IdentityConflictError."""
    insert_or_ignore = _insert(session)
    session.execute(
        insert_or_ignore(Series)
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
    return int(series_id)


def record_instance(
    session: Session,
    meta: InstanceMeta,
    spooled: SpooledFile,
    calling_ae: str | None,
    *,
    fingerprint: str,
    sha256: str | None = None,
) -> int:
    """Add study, series (if new), instance and its job to ``session`` (no commit); return the instance's id. Job is
    SKIPPED when gated.

    The study is made with ``fingerprint`` (daemon.store.identity) or, if it exists, carries the same one; the series
    must belong to this study. Concurrent senders of one new Study UID both insert-or-ignore, then compare what was
    stored, so exactly one patient owns it. Raises IdentityConflictError (roll the session back) otherwise.

    Fast path: when the series is stored under this study and the study carries ``fingerprint``, one read answers
    both checks (a set fingerprint never changes and a series never moves, so nothing is left to insert or claim)."""
    conn = session.connection()
    known = conn.execute(_SELECT_SERIES, {"uid": meta.series_instance_uid}).first()
    if known is not None and known[2] == meta.study_instance_uid and known[3] == fingerprint:
        series_id = known[0]
    else:
        series_id = _series_id(session, meta, _study_id(session, meta, fingerprint))
    instance_id = conn.execute(
        _INSERT_INSTANCE,
        {
            "sop_instance_uid": meta.sop_instance_uid,
            "sop_class_uid": meta.sop_class_uid,
            "series_id": series_id,
            "transfer_syntax_uid": meta.transfer_syntax_uid,
            "path": spooled.relative_path,
            "size_bytes": spooled.size_bytes,
            "sha256": sha256,
            "calling_ae": calling_ae,
            "modality": meta.modality,
            "body_part": meta.body_part,
            "view_position": meta.view_position,
            "skip_reason": meta.skip_reason,
        },
    ).inserted_primary_key[0]
    state = JobState.SKIPPED if meta.skip_reason else JobState.QUEUED
    conn.execute(_INSERT_JOB, {"instance_id": instance_id, "state": state, "error": meta.skip_reason})
    return int(instance_id)


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


def _sha256(data: Payload) -> str:
    digest = hashlib.sha256()
    for chunk in as_chunks(data):
        digest.update(chunk)
    return digest.hexdigest()


class PendingWrite:
    """A received file being written, hashed and fsynced to a temp file on a writer thread
    (:meth:`InstanceStore.begin_write`), while the caller parses the dataset. The caller must :meth:`close` it (in a
    ``finally``) before it lets go of the buffers: that waits for the write and removes the temp file unless
    :meth:`InstanceStore.save` claimed it."""

    def __init__(self, write: Future[Path], digest: Future[str], spool: Spool) -> None:
        self._write = write
        self._digest = digest
        self._spool = spool
        self._claimed = False

    def claim(self) -> tuple[Path, str]:
        """(temp file, SHA-256 hex of the file) once written and fsynced; raises the write's OSError (disk,
        reserve)."""
        sha256 = self._digest.result()
        tmp = self._write.result()
        self._claimed = True
        return tmp, sha256

    def close(self) -> None:
        """Wait for the write and the hash; remove the temp file unless claimed. Never raises for a failed write."""
        try:
            self._digest.result()
        except Exception:
            pass
        try:
            tmp = self._write.result()
        except Exception:
            return  # nothing was left behind (write_temp removes its file on failure)
        if not self._claimed:
            self._spool.discard(tmp)


class _Rollback(Exception):
    """Leaves a transaction without committing it (an identity conflict: the image is held, nothing recorded)."""


class InstanceStore:
    """Stores instances durably. Thread-safe: concurrent stores of one SOP Instance UID are serialised.

    Identity (daemon.store.identity): an instance is never merged into a study of another patient, a series of another
    study, or over a stored instance with other content; it is held (StoreOutcome.CONFLICT, see :func:`hold`).
    ``key`` defaults to ``<data_dir>/identity.key`` with the data dir the spool root's parent."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session], key: IdentityKey | None = None) -> None:
        self.spool = spool
        self.sessions = sessions
        self.key = key or IdentityKey.for_data_dir(spool.root.parent)
        self._locks = [threading.Lock() for _ in range(64)]
        self._writers: ThreadPoolExecutor | None = None
        self._writers_lock = threading.Lock()

    def _lock(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % len(self._locks)]

    WRITER_THREADS = 8  # concurrent temp-file writes (one per association in its C-STORE handler); more wait

    def _write(self, data: Payload) -> tuple[Path, str]:
        digest = hashlib.sha256()
        tmp = self.spool.write_temp(data, digest=digest)
        return tmp, digest.hexdigest()

    def begin_write(self, data: Payload) -> PendingWrite:
        """Start writing ``data`` (the complete DICOM file) to a fsynced temp file on a writer thread, and hashing it
        on another; pass the result to :meth:`save` (``pending=``) and :meth:`PendingWrite.close` it in any case.
        ``data`` must stay unchanged and alive until then. Write, fsync (I/O wait), hash and the caller's parsing
        overlap (each releases the GIL for its heavy part): an 8 MB image no longer waits for them one after the
        other."""
        with self._writers_lock:
            if self._writers is None:
                self._writers = ThreadPoolExecutor(2 * self.WRITER_THREADS, thread_name_prefix="chexd-spool-write")
            return PendingWrite(
                self._writers.submit(self.spool.write_temp, data), self._writers.submit(_sha256, data), self.spool
            )

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
        pending: PendingWrite | None = None,
    ) -> StoreOutcome:
        """Store ``data`` (the complete DICOM file: bytes or chunks). Raises OSError (disk, reserve) or SQLAlchemyError
        (database) with nothing left behind. A known SOP Instance UID with the same dataset returns DUPLICATE and
        changes nothing; an identity conflict returns CONFLICT with the bytes held in the quarantine (both are
        acknowledged by the SCP: the bytes are safe).

        One transaction does the duplicate look-up, the identity checks and the inserts; the fsynced temp file is
        renamed into place (folder fsynced) inside it, before the commit, so 0x0000 follows file, folder and rows.
        ``pending`` (from :meth:`begin_write` with the same ``data``) is the temp file already being written; without
        it the file is written here."""
        uid = meta.sop_instance_uid
        rel = self.spool.relative_path(meta.study_instance_uid, meta.series_instance_uid, uid)
        fingerprint = self.key.fingerprint(meta.identity)
        tmp, sha256 = self._write(data) if pending is None else pending.claim()
        size = sum(memoryview(chunk).nbytes for chunk in as_chunks(data))
        conflict: IdentityConflictError | None = None
        spooled: SpooledFile | None = None
        with self._lock(uid):
            try:
                with self.sessions.begin() as session:
                    existing = session.connection().execute(_SELECT_STORED, {"uid": uid}).first()
                    if existing is not None:
                        conflict = self._sop_conflict(tmp, sha256, fingerprint, tuple(existing))
                        if conflict is None:
                            self.spool.discard(tmp)
                            return StoreOutcome.DUPLICATE
                    else:
                        try:
                            record_instance(
                                session,
                                meta,
                                SpooledFile(relative_path=rel, absolute_path=self.spool.root / rel, size_bytes=size),
                                calling_ae,
                                fingerprint=fingerprint,
                                sha256=sha256,
                            )
                        except IdentityConflictError as exc:  # nothing was renamed: the temp file is held
                            conflict = exc
                        else:
                            spooled = self.spool.commit(tmp, rel)
                    if conflict is not None:
                        raise _Rollback  # undo the insert-or-ignore of a study or series that the conflict named
            except _Rollback:
                pass
            except BaseException:
                if spooled is not None:
                    self.spool.remove(rel)
                else:
                    self.spool.discard(tmp)
                raise
            if conflict is not None:
                hold(self.spool, self.sessions, tmp, meta, conflict, fingerprint=fingerprint, sha256=sha256,
                     calling_ae=calling_ae)
                return StoreOutcome.CONFLICT
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
