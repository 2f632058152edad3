"""One base for the daemon's background loops (inference jobs, reports, forwarding): threads that repeat a step
until stopped, wake early when new work is enqueued, pause below the disk reserve, and survive errors.

A subclass says what one step is (:meth:`Loop.step`: True when more work may be waiting at once), how long to wait
when there is none (:meth:`Loop.poll_seconds`), and optionally when to pause (:meth:`Loop.paused`)."""

from __future__ import annotations

import logging
import threading
import time

from daemon.store.spool import DiskPause, is_disk_full

log = logging.getLogger(__name__)


class Loop:
    """``threads`` threads named ``name`` (``name-<i>`` for more than one) running :meth:`step` in a loop.

    ``error_wait``: seconds a thread rests after an unexpected error (a full disk pauses ``disk`` instead of logging
    a traceback); ``paused_wait``: seconds between looks while :meth:`paused`. Both waits end at once on stop."""

    error_wait = 2.0
    paused_wait = 1.0

    def __init__(self, name: str, *, threads: int = 1, disk: DiskPause | None = None) -> None:
        self.name = name
        self.thread_count = max(1, threads)
        self.disk = disk
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- what a subclass says -------------------------------------------------------------------------------------

    def step(self, index: int) -> bool:
        """Do one unit of work on thread ``index``; True when more may be waiting (the loop goes on at once)."""
        raise NotImplementedError

    def poll_seconds(self) -> float:
        """Seconds to wait for a :meth:`wake` when a step found nothing to do."""
        raise NotImplementedError

    def paused(self) -> bool:
        """True while the loop must not work (by default: below the disk reserve, when it has a ``disk``)."""
        return self.disk is not None and self.disk.blocked()

    def thread_name(self, index: int) -> str:
        return self.name if self.thread_count == 1 else f"{self.name}-{index}"

    # --- life cycle ---------------------------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=self.thread_name(i), daemon=True)
            for i in range(self.thread_count)
        ]
        for thread in self._threads:
            thread.start()

    def wake(self) -> None:
        """New work was enqueued: end the poll wait now."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the threads to stop and wait up to ``timeout`` seconds in all; True when every thread has ended."""
        self.signal_stop()
        return self.join(time.monotonic() + timeout)

    def signal_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, deadline: float, *, minimum: float = 0.0) -> bool:
        """Wait for the threads until ``deadline`` (time.monotonic), at least ``minimum`` seconds each; True when
        every thread has ended."""
        for thread in self._threads:
            thread.join(max(minimum, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            if self.paused():
                self._stop.wait(self.paused_wait)
                continue
            try:
                if self.step(index):
                    continue
            except Exception as exc:
                if self.disk is not None and is_disk_full(exc):
                    self.disk.hit(exc)
                else:
                    log.exception("%s: error in the loop; retrying shortly", self.thread_name(index))
                self._stop.wait(self.error_wait)
            self._wake.wait(self.poll_seconds())
            self._wake.clear()
