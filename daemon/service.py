"""The daemon process: database at head, start-up recovery, worker threads, then the Storage SCP."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from types import FrameType

from daemon import logsafety
from daemon.edge.intake import pixel_limits
from daemon.edge.scp import StorageSCP
from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import InstanceStore, audit
from daemon.store.recovery import RecoveryReport, recover
from daemon.store.registry import resolve_model_path
from daemon.store.spool import DiskGuard, Spool
from daemon.work.forward import ForwardLoop
from daemon.work.inference import ActiveModelProcessor
from daemon.work.reports import ReportLoop, ReportScheduler
from daemon.work.worker import Processor, WorkerPool, decode_statistics

log = logging.getLogger(__name__)

STOP_SECONDS = 8.0  # SIGTERM to exit: the whole shutdown fits in this (a service manager's kill usually waits 10 s)


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` through the PHI filter (daemon/logsafety.py): library warnings are logged with
    their values redacted, pynetdicom at WARNING or above."""
    logsafety.install(level)


class Daemon:
    """One chexd node. ``start()`` returns once the SCP listens; ``stop()`` drains workers and closes the port."""

    def __init__(self, settings: Settings, processor: Processor | None = None) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings.effective_database_url)
        self.sessions = session_factory(self.engine)
        processor = processor or self._default_processor()
        # One disk reserve for every writer: spool, quarantine, archives, reports, forwarding.
        self.guard = DiskGuard(settings.disk_reserve_mb * 2**20)
        self.spool = Spool(settings.spool_dir, settings.quarantine_dir, guard=self.guard)
        self.store = InstanceStore(self.spool, self.sessions)
        self.processor = processor
        self.forwards = ForwardLoop(self.sessions, settings, guard=self.guard)
        self.reports = ReportLoop(self.sessions, self.spool, settings, on_written=self.forwards.wake)
        scheduler = ReportScheduler(settings, on_prediction=self.reports.prepare, guard=self.guard)
        self.workers = WorkerPool(self.sessions, self.spool, settings, processor, sink=scheduler)
        self.scp = StorageSCP(settings, self.store, on_stored=self.workers.wake)
        self.recovery: RecoveryReport | None = None
        self._stopped = threading.Event()

    def _default_processor(self) -> Processor:
        path = resolve_model_path(self.settings)
        if path is None:
            log.warning("no model configured and none bundled: images are stored and decoded but not analysed")
            return functools.partial(decode_statistics, limits=pixel_limits(self.settings))
        return ActiveModelProcessor(self.settings, self.sessions)

    def start(self) -> None:
        revision = upgrade_to_head(self.engine)
        log.info("database at revision %s", revision)
        self._audit_start()  # before any job, report or forward: the model they are made with is on record
        self.recovery = recover(self.spool, self.sessions, self.settings.data_dir, pixel_limits(self.settings))
        if isinstance(self.processor, ActiveModelProcessor):
            self.processor.load()
        self.workers.start()
        self.reports.start()
        self.forwards.start()
        self.scp.start()

    def _audit_start(self) -> None:
        """Register the served model as the active baseline when nothing is active yet, and audit the start."""
        if isinstance(self.processor, ActiveModelProcessor):
            from daemon.store.registry import register_baseline

            active = register_baseline(self.sessions, self.settings)
            log.info("active model %s", active.version if active else "none")
        else:
            audit(self.sessions, "daemon_started", detail="no registry model: a fixed processor (tests or no model)")

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Close the port, let running work finish for a few seconds, then stop; returns within about ``timeout``
        seconds. Work cut short is not lost: a job's lease, or a report put back to PENDING, resumes at the next
        start. Ends with the log line "chexd stopped"."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        started = time.monotonic()
        deadline = started + timeout

        def left(share: float) -> float:
            return max(0.1, (deadline - time.monotonic()) * share)

        log.info("stopping: closing the DICOM port, then draining workers")
        self.scp.stop()
        workers_ended = self.workers.stop(timeout=left(0.4))
        self.reports.stop(timeout=left(0.8))
        self.forwards.stop(timeout=left(1.0))
        if isinstance(self.processor, ActiveModelProcessor) and workers_ended:
            self.processor.close()
        self.engine.dispose()
        log.info("chexd stopped (%.1f s)", time.monotonic() - started)

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        done = threading.Event()

        def _signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received signal %s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
