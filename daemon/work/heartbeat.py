"""The node's heartbeat: one thread that says every ``heartbeat_seconds`` that this node is alive (which keeps every
lease it holds) and takes over the work of nodes that stopped saying so (daemon.store.nodes.sweep)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.store.nodes import heartbeat, sweep
from daemon.work.loop import Loop

log = logging.getLogger(__name__)


class HeartbeatLoop(Loop):
    """Heartbeat, then sweep for dead nodes, every ``settings.heartbeat_seconds``. ``on_takeover`` (no arguments) is
    called after work of a dead node was put back, to wake this node's loops. Never paused by the disk reserve: a node
    below it still holds its leases. A failed beat (database unreachable, SQLite on a full disk) is one ERROR line when
    beats start failing and one INFO line when they work again, never a traceback per beat; a node that cannot write
    its heartbeat for ``node_timeout_seconds`` is taken over by the others."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        holder: str,
        *,
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        super().__init__("chexd-heartbeat")
        self.sessions = sessions
        self.settings = settings
        self.holder = holder
        self.on_takeover = on_takeover
        self.beats = 0
        self.failing = False
        self.taken_over: dict[str, object] = {}  # dead holder -> daemon.store.nodes.Released

    def poll_seconds(self) -> float:
        return self.settings.heartbeat_seconds

    def step(self, index: int) -> bool:
        try:
            heartbeat(self.sessions, self.holder)
        except Exception as exc:
            if not self.failing:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                log.error("heartbeat failed (%s: %s); other nodes take this node's work over if this lasts %g s",
                          type(exc).__name__, reason, self.settings.node_timeout_seconds)
                self.failing = True
            return False
        if self.failing:
            log.info("heartbeat written again")
            self.failing = False
        self.beats += 1
        dead = sweep(self.sessions, self.holder, self.settings.node_timeout_seconds)
        if dead:
            self.taken_over.update(dead)
            if self.on_takeover is not None and any(dead.values()):
                self.on_takeover()
        return False
