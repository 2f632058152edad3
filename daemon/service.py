"""The daemon process: database at head, its row in the nodes table, start-up recovery, the heartbeat, the loops of
its roles, then the Storage SCP (role ``scp``). Several processes may share one PostgreSQL database and one data dir
(README "High availability"): each is a node with some of the roles scp, worker, reports, forward."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from sqlalchemy import text

from daemon import logsafety
from daemon.edge.intake import pixel_limits
from daemon.edge.scp import StorageSCP
from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import InstanceStore, audit
from daemon.store.nodes import leave, others_live, register
from daemon.store.recovery import RecoveryReport, recover
from daemon.store.registry import resolve_model_path
from daemon.store.spool import DiskGuard, Spool
from daemon.work.forward import ForwardLoop
from daemon.work.heartbeat import HeartbeatLoop
from daemon.work.inference import ActiveModelProcessor
from daemon.work.reports import ReportLoop, ReportScheduler
from daemon.work.worker import Processor, WorkerPool, decode_statistics

log = logging.getLogger(__name__)

STOP_SECONDS = 8.0  # SIGTERM to exit: the whole shutdown fits in this (a service manager's kill usually waits 10 s)
_START_LOCK = 0x63686578  # PostgreSQL advisory lock key ("chex"): nodes starting together start one at a time


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` through the PHI filter (daemon/logsafety.py): library warnings are logged with
    their values redacted, pynetdicom at WARNING or above."""
    logsafety.install(level)


class Daemon:
    """One chexd node with the roles ``settings.roles``. ``start()`` returns once the SCP listens (role scp) and every
    loop of its roles runs; ``stop()`` closes the port, drains the loops and leaves the nodes table."""

    def __init__(self, settings: Settings, processor: Processor | None = None) -> None:
        self.settings = settings
        self.roles = frozenset(settings.roles)
        self.engine = create_db_engine(settings.effective_database_url)
        self.sessions = session_factory(self.engine)
        if processor is None:  # a node without the worker role never loads a model
            processor = self._default_processor() if "worker" in self.roles else functools.partial(
                decode_statistics, limits=pixel_limits(settings))
        # One disk reserve for every writer: spool, quarantine, archives, reports, forwarding.
        self.guard = DiskGuard(settings.disk_reserve_mb * 2**20)
        self.spool = Spool(settings.spool_dir, settings.quarantine_dir, guard=self.guard)
        self.store = InstanceStore(self.spool, self.sessions)
        self.processor = processor
        self.forwards = ForwardLoop(self.sessions, settings, guard=self.guard)
        self.reports = ReportLoop(self.sessions, self.spool, settings, on_written=self.forwards.wake)
        # the report worker processes start with this node's first prediction only when it writes reports too
        prepare = self.reports.prepare if "reports" in self.roles else None
        scheduler = ReportScheduler(settings, on_prediction=prepare, guard=self.guard)
        self.workers = WorkerPool(self.sessions, self.spool, settings, processor, sink=scheduler)
        self.scp = StorageSCP(settings, self.store, on_stored=self.workers.wake)
        self.recovery: RecoveryReport | None = None
        self.holder: str | None = None  # host/pid, once in the nodes table
        self.heartbeat: HeartbeatLoop | None = None
        self._stopped = threading.Event()

    def _loops(self) -> list[tuple[str, ForwardLoop | ReportLoop | WorkerPool]]:
        """(role, loop) of this node's roles, in start order."""
        return [(role, loop) for role, loop in
                (("worker", self.workers), ("reports", self.reports), ("forward", self.forwards))
                if role in self.roles]

    def _wake_all(self) -> None:
        for _role, loop in self._loops():
            loop.wake()

    def _default_processor(self) -> Processor:
        path = resolve_model_path(self.settings)
        if path is None:
            log.warning("no model configured and none bundled: images are stored and decoded but not analysed")
            return functools.partial(decode_statistics, limits=pixel_limits(self.settings))
        return ActiveModelProcessor(self.settings, self.sessions)

    def start(self) -> None:
        """Raises daemon.store.nodes.NodeRefusedError (exit 2) when this node may not join the database (roles or a
        second node on SQLite, a node name in use), OSError when the port is taken."""
        with self._one_node_at_a_time():
            revision = upgrade_to_head(self.engine)
            log.info("database at revision %s", revision)
            self.holder = register(self.sessions, self.settings)
            self._audit_start()  # before any job, report or forward: the model they are made with is on record
        # at once: recovery and loading the model take seconds, longer than other nodes wait for a heartbeat
        self.heartbeat = HeartbeatLoop(self.sessions, self.settings, self.holder, on_takeover=self._wake_all)
        self.heartbeat.start()
        others = others_live(self.sessions, self.settings.node_timeout_seconds)
        self.recovery = recover(self.spool, self.sessions, self.settings.data_dir, pixel_limits(self.settings),
                                shared=others > 0)
        if isinstance(self.processor, ActiveModelProcessor):
            self.processor.load()
        for _role, loop in self._loops():
            loop.start()
        if "scp" in self.roles:
            self.scp.start()
        log.info("chexd node %s started with roles %s (%d other live node(s))", self.holder,
                 ",".join(sorted(self.roles)), others)

    @contextlib.contextmanager
    def _one_node_at_a_time(self) -> Iterator[None]:
        """On PostgreSQL, hold an advisory lock: nodes starting together on one database upgrade it, join the nodes
        table and register the baseline model (a row and a copy in the shared data dir) one after the other."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _START_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _START_LOCK})
                conn.commit()

    def _audit_start(self) -> None:
        """Register the served model as the active baseline when nothing is active yet, and audit the start."""
        if isinstance(self.processor, ActiveModelProcessor):
            from daemon.store.registry import register_baseline

            active = register_baseline(self.sessions, self.settings)
            log.info("active model %s", active.version if active else "none")
        elif "worker" in self.roles:
            audit(self.sessions, "daemon_started", detail="no registry model: a fixed processor (tests or no model)")
        else:
            audit(self.sessions, "daemon_started", detail=f"roles {','.join(sorted(self.roles))}: no model")

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
        self.forwards.stop(timeout=left(0.9))
        if isinstance(self.processor, ActiveModelProcessor) and workers_ended:
            self.processor.close()
        if self.heartbeat is not None:
            self.heartbeat.stop(timeout=left(0.5))
        if self.holder is not None:
            try:  # what was cut short goes to the other nodes now, not after the node timeout
                leave(self.sessions, self.holder)
            except Exception:
                log.exception("could not leave the nodes table; other nodes take over after node_timeout_seconds")
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
