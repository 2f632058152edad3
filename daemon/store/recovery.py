"""Start-up recovery: make spool and database agree again after a crash or power loss.

1. partial writes are deleted: the spool's temp folder (their senders never got 0x0000), unfinished quarantine files,
   report staging folders and prediction archive temp files;
2. jobs whose lease expired, or whose holder on this host is gone, are re-queued; reports left WRITING by a process
   that is gone are due again at once (not after their lease);
3. files on disk with no instance row (a crash between rename and commit) are adopted: rows and a job are created.

With other live nodes on the database (``shared``: one spool on a shared filesystem), a file or folder younger than
:data:`SHARED_MIN_AGE` may be another node's write in progress: steps 1 and 3 leave it alone (the next start, or the
row lease, deals with it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.intake import inspect
from daemon.store.instances import StoreOutcome, adopt, audit
from daemon.store.spool import Spool, SpooledFile, fsync_dir
from daemon.store.tables import Instance
from daemon.work.reports import remove_stale_staging, resume_orphaned_reports
from daemon.work.worker import requeue_expired
from model.preprocess import DEFAULT_LIMITS, PixelLimits, read_dicom

log = logging.getLogger(__name__)

SHARED_MIN_AGE = 3600.0  # seconds: with other live nodes, younger temp files, staging folders and orphans are theirs


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryReport:
    temp_files_removed: int
    jobs_requeued: int
    files_reindexed: int
    files_quarantined: int
    reports_resumed: int = 0


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def remove_aged_temp_files(spool: Spool, min_age: float) -> int:
    """Like Spool.remove_stale_temp_files, only for files older than ``min_age`` seconds (others may be in use by
    another node sharing the spool)."""
    count = 0
    for folder, pattern in ((spool.tmp, "*"), (spool.quarantine, "*.part")):
        removed = 0
        for path in folder.glob(pattern):
            if _older_than(path, min_age):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(folder)
        count += removed
    return count


def reindex(
    spool: Spool, sessions: sessionmaker[Session], limits: PixelLimits = DEFAULT_LIMITS, *, min_age: float = 0.0
) -> tuple[int, int]:
    """Adopt spool files missing from the database; quarantine ones that no longer parse or exceed ``limits`` (read
    as at the edge: a deflated file is inflated with a cap). With ``min_age`` > 0, only files older than that many
    seconds (a younger one may be another node's store between rename and commit). Returns (adopted, quarantined)."""
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    adopted = quarantined = 0
    for rel in spool.iter_files():
        if rel in known:
            continue
        path = spool.path_of(rel)
        if min_age > 0 and not _older_than(path, min_age):
            continue
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
    *,
    shared: bool = False,
) -> RecoveryReport:
    """Run the start-up recovery steps (module docstring); ``data_dir`` holds reports and archives (default: the
    spool's parent folder); ``limits`` are the image size limits of the edge (settings); ``shared``: other live nodes
    use the database and the spool (young files are left to them)."""
    min_age = SHARED_MIN_AGE if shared else 0.0
    removed = remove_aged_temp_files(spool, min_age) if shared else spool.remove_stale_temp_files()
    removed += remove_stale_staging(data_dir if data_dir is not None else spool.root.parent, min_age=min_age)
    requeued = requeue_expired(sessions, at_startup=True)
    resumed = resume_orphaned_reports(sessions)
    adopted, quarantined = reindex(spool, sessions, limits, min_age=min_age)
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
