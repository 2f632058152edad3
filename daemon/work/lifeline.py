"""Ties a worker process to the daemon that started it, so it never outlives it (kill -9, crash, power cut).

Kept apart from daemon.work.reports and light on imports on purpose: a spawned worker process runs :func:`worker_init`
as soon as its interpreter has started, before the heavy imports the work needs, so the time during which a worker
whose daemon died could still run is a fraction of a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_ORPHAN_EXIT = 70  # exit status of a worker process that found its daemon gone
_daemon_pid: int | None = None  # in a worker process: the daemon that started it


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: ask the kernel to send ``signum`` to this process when its parent dies. False where unavailable.

    Caveat (prctl(2)): the signal follows the parent *thread* that created the process, so
    :class:`daemon.work.reports.ReportLoop` starts its worker processes from one thread that outlives them
    (``chexd-report-pool``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def exit_if_orphaned() -> None:
    """In a worker process: exit at once (no clean-up, no further write) when the daemon that started it is gone."""
    if _daemon_pid is not None and os.getppid() != _daemon_pid:
        os._exit(_ORPHAN_EXIT)


def _watch_lifeline(lifeline: Any) -> None:
    """Block until the daemon's end of the lifeline pipe closes (the daemon exited or was killed), then exit."""
    try:
        while True:
            lifeline.recv_bytes()  # the daemon never sends; this returns only with EOFError
    except (EOFError, OSError):
        pass
    os._exit(_ORPHAN_EXIT)


def worker_init(daemon_pid: int, lifeline: Any, log_level: str = "INFO") -> None:
    """Initializer of every report worker process: die with the daemon, never outlive it; then log like it (a spawned
    process inherits no logging: without daemon/logsafety.py library warnings, which highdicom fills with person names,
    would reach the daemon's log unfiltered through stderr).

    Three guards: PR_SET_PDEATHSIG(SIGKILL) (the kernel kills this process when the daemon dies, on Linux); a thread
    that exits when the read end ``lifeline`` (a multiprocessing Connection whose only write end the daemon holds) sees
    end-of-file; and :func:`exit_if_orphaned` (``os.getppid()`` is no longer ``daemon_pid``) before and after each
    report is composed, which also covers a daemon that died before the first two were in place."""
    global _daemon_pid
    _daemon_pid = daemon_pid
    _set_parent_death_signal(signal.SIGKILL)
    exit_if_orphaned()
    threading.Thread(target=_watch_lifeline, args=(lifeline,), name="chexd-lifeline", daemon=True).start()
    from daemon import logsafety

    logsafety.install(log_level)
