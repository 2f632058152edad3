"""Durable storage of one instance: file in the spool and rows in the database, both or neither.

Order (the answer 0x0000 may only follow a full success): write + fsync a temp file; rename into place + fsync the
folder; insert study/series/instance/job in one transaction. If the transaction fails the renamed file is removed.
A crash between rename and commit leaves a file without rows, which :func:`daemon.recovery.reindex` adopts.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from daemon.intake import InstanceMeta
from daemon.spool import Payload, Spool, SpooledFile
from daemon.tables import AuditEvent, Instance, Job, JobState, Series, Study

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def record_instance(
    session: Session, meta: InstanceMeta, spooled: SpooledFile, calling_ae: str | None
) -> Instance:
    """Add study, series (if new), instance and its job to ``session`` (no commit). Job is SKIPPED when gated."""
    insert = _insert(session)
    session.execute(
        insert(Study)
        .values(study_instance_uid=meta.study_instance_uid, study_date=meta.study_date)
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == meta.study_instance_uid))
    session.execute(
        insert(Series)
        .values(series_instance_uid=meta.series_instance_uid, study_id=study_id, modality=meta.modality)
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
    )
    series_id = session.scalar(
        select(Series.id).where(Series.series_instance_uid == meta.series_instance_uid)
    )
    instance = Instance(
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        series_id=series_id,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        path=spooled.relative_path,
        size_bytes=spooled.size_bytes,
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


class InstanceStore:
    """Stores instances durably. Thread-safe: concurrent stores of one SOP Instance UID are serialised."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session]) -> None:
        self.spool = spool
        self.sessions = sessions
        self._locks = [threading.Lock() for _ in range(64)]

    def _lock(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % len(self._locks)]

    def exists(self, sop_instance_uid: str) -> bool:
        with self.sessions() as session:
            return (
                session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
                is not None
            )

    def save(
        self,
        meta: InstanceMeta,
        data: Payload,
        calling_ae: str | None,
        *,
        after_commit: Callable[[], None] | None = None,
    ) -> StoreOutcome:
        """Store ``data`` (the complete DICOM file: bytes or chunks). Raises OSError (disk, reserve) or SQLAlchemyError
        (database) with nothing left behind; a known SOP Instance UID returns DUPLICATE and changes nothing."""
        uid = meta.sop_instance_uid
        rel = self.spool.relative_path(meta.study_instance_uid, meta.series_instance_uid, uid)
        tmp = self.spool.write_temp(data)
        with self._lock(uid):
            try:
                duplicate = self.exists(uid)
            except BaseException:
                self.spool.discard(tmp)
                raise
            if duplicate:
                self.spool.discard(tmp)
                return StoreOutcome.DUPLICATE
            spooled = self.spool.commit(tmp, rel)
            try:
                with self.sessions.begin() as session:
                    record_instance(session, meta, spooled, calling_ae)
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
