"""Start-up recovery: make spool and database agree again after a crash or power loss.

1. partial writes are deleted: the spool's temp folder (their senders never got 0x0000), unfinished quarantine files,
   report staging folders and prediction archive temp files;
2. jobs whose lease expired, or whose holder on this host is gone, are re-queued; reports left WRITING by a process
   that is gone are due again at once (not after their lease);
3. files on disk with no instance row (a crash between rename and commit) are adopted: rows and a job are created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.intake import inspect
from daemon.store.instances import StoreOutcome, adopt, audit
from daemon.store.spool import Spool, SpooledFile
from daemon.store.tables import Instance
from daemon.work.reports import remove_stale_staging, resume_orphaned_reports
from daemon.work.worker import requeue_expired
from model.preprocess import DEFAULT_LIMITS, PixelLimits, read_dicom

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryReport:
    temp_files_removed: int
    jobs_requeued: int
    files_reindexed: int
    files_quarantined: int
    reports_resumed: int = 0


def reindex(
    spool: Spool, sessions: sessionmaker[Session], limits: PixelLimits = DEFAULT_LIMITS
) -> tuple[int, int]:
    """Adopt spool files missing from the database; quarantine ones that no longer parse or exceed ``limits`` (read
    as at the edge: a deflated file is inflated with a cap). Returns (adopted, quarantined)."""
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    adopted = quarantined = 0
    for rel in spool.iter_files():
        if rel in known:
            continue
        path = spool.path_of(rel)
        try:
            ds = read_dicom(path, limits)
            meta = inspect(ds, str(ds.file_meta.TransferSyntaxUID), limits)
        except Exception as exc:
            try:
                spool.quarantine_bytes(path.read_bytes(), f"re-index: stored file cannot be parsed: {exc}")
            except OSError as error:  # e.g. below the disk reserve: keep it where it is, try at the next start
                log.warning("re-index: %s cannot be parsed nor quarantined now (%s); left in place", rel, error)
                continue
            spool.remove(rel)
            quarantined += 1
            continue
        spooled = SpooledFile(relative_path=rel, absolute_path=path, size_bytes=path.stat().st_size)
        try:
            outcome = adopt(spool, sessions, meta, spooled)  # identity checks too: a conflict goes to quarantine
        except IntegrityError:
            log.warning(
                "re-index: %s is already recorded under another path; left in place", meta.sop_instance_uid
            )
            continue
        if outcome is StoreOutcome.CONFLICT:
            quarantined += 1
            continue
        adopted += 1
        log.info("re-indexed orphan file sop_instance_uid=%s", meta.sop_instance_uid)
    return adopted, quarantined


def recover(
    spool: Spool,
    sessions: sessionmaker[Session],
    data_dir: Path | None = None,
    limits: PixelLimits = DEFAULT_LIMITS,
) -> RecoveryReport:
    """Run the start-up recovery steps (module docstring); ``data_dir`` holds reports and archives (default: the
    spool's parent folder); ``limits`` are the image size limits of the edge (settings)."""
    removed = spool.remove_stale_temp_files()
    removed += remove_stale_staging(data_dir if data_dir is not None else spool.root.parent)
    requeued = requeue_expired(sessions, at_startup=True)
    resumed = resume_orphaned_reports(sessions)
    adopted, quarantined = reindex(spool, sessions, limits)
    report = RecoveryReport(
        temp_files_removed=removed,
        jobs_requeued=requeued,
        files_reindexed=adopted,
        files_quarantined=quarantined,
        reports_resumed=resumed,
    )
    if any((removed, requeued, adopted, quarantined, resumed)):
        audit(sessions, "startup_recovery", detail=str(report))
    log.info("start-up recovery %s", report)
    return report
