"""The nodes table: every ``chexd serve`` process sharing one database says who it is and that it is alive, and the
live ones take over what a dead one held.

A node's *holder* (``host/pid``) prefixes each lease it takes: ``jobs.leased_by`` (``holder/<thread>``),
``study_reports.error`` while WRITING (``being written by holder``) and ``forwards.claimed_by``. Its heartbeat
(:func:`heartbeat`, one UPDATE every ``heartbeat_seconds``) keeps all of them, whatever it holds. A node whose heartbeat
is older than ``node_timeout_seconds`` is dead: the first live node to notice (:func:`sweep`) marks its row DEAD in
one conditional UPDATE (so exactly one node takes over) and, in the same transaction, puts its RUNNING jobs back in
the queue, its WRITING reports back to PENDING (due now) and its claimed forwards back to due (:func:`release`). The
row leases (``job_lease_seconds``, the report and forward leases) stay as the last guard.

SQLite is the single-node embedded default: there a node must have every role, and a second live node is refused
(:func:`register`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import ROLES, Settings, SettingsError
from daemon.store.tables import (
    Forward,
    ForwardState,
    Job,
    JobState,
    Node,
    NodeState,
    ReportState,
    StudyReportRow,
    utcnow,
)

log = logging.getLogger(__name__)

HOST = socket.gethostname()
WRITER_PREFIX = "being written by "  # + holder, in study_reports.error while WRITING
KEEP_ENDED = timedelta(days=7)  # rows of stopped or dead nodes are deleted after this (at a node's start)


class NodeRefusedError(SettingsError):
    """This node cannot join: roles or a second node on SQLite, or its name is taken by a live node (exit 2)."""


def this_holder() -> str:
    """This process's lease prefix: ``host/pid``."""
    return f"{HOST}/{os.getpid()}"


def chexd_version() -> str:
    try:
        return metadata.version("chexd")
    except metadata.PackageNotFoundError:
        return "unknown"


def node_name(settings: Settings) -> str:
    """The node's name in the nodes table: ``node_name``, or the host name."""
    return settings.node_name or HOST


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0; a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(state: Any, heartbeat_at: datetime, *, now: datetime, timeout_s: float, host: str, pid: int) -> bool:
    """Whether a node row names a live node: ALIVE with a heartbeat younger than ``timeout_s`` and, on this host, a
    process that exists (another process with our pid is an earlier one whose pid was reused)."""
    if NodeState(state) is not NodeState.ALIVE or heartbeat_at < now - timedelta(seconds=timeout_s):
        return False
    if host == HOST:
        return pid != os.getpid() and pid_alive(pid)
    return True


@dataclass(frozen=True, kw_only=True, slots=True)
class Released:
    """What a node held when it was taken over (or stopped): jobs re-queued, reports due again, forwards due again."""

    jobs: int = 0
    reports: int = 0
    forwards: int = 0

    def __bool__(self) -> bool:
        return bool(self.jobs or self.reports or self.forwards)


def release(session: Session, holder: str, *, now: datetime | None = None) -> Released:
    """Give back everything ``holder`` holds, in the caller's transaction: RUNNING jobs to QUEUED (available now,
    the attempt counted), WRITING reports to PENDING (due now), claimed forwards due now. Its late writes are refused
    by the fences that already guard a lost lease (a job's finish matches its holder, a report's its writer, a
    forward's its attempt count)."""
    now = now or utcnow()
    jobs = session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.leased_by.startswith(holder + "/", autoescape=True))
        .values(state=JobState.QUEUED, leased_by=None, lease_expires_at=None, available_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    reports = session.execute(
        update(StudyReportRow)
        .where(StudyReportRow.state == ReportState.WRITING, StudyReportRow.error == WRITER_PREFIX + holder)
        .values(state=ReportState.PENDING, due_at=now, error=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    forwards = session.execute(
        update(Forward)
        .where(Forward.state == ForwardState.QUEUED, Forward.claimed_by == holder)
        .values(available_at=now, claimed_by=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    return Released(jobs=jobs, reports=reports, forwards=forwards)


def register(sessions: sessionmaker[Session], settings: Settings, roles: tuple[str, ...] | None = None) -> str:
    """Record this process as an ALIVE node (a row of an earlier process with the same holder, a reused pid, is taken
    over); return its holder. Rows of nodes that ended over :data:`KEEP_ENDED` ago are deleted.

    Raises NodeRefusedError on SQLite when ``roles`` is not every role or another live node uses the database, and
    anywhere when a live node on another host has the same ``node_name``."""
    roles = tuple(roles or settings.roles)
    holder, name, now = this_holder(), node_name(settings), utcnow()
    with sessions.begin() as session:
        sqlite = session.get_bind().dialect.name == "sqlite"
        if sqlite and set(roles) != set(ROLES):
            raise NodeRefusedError(
                f"roles {','.join(roles)} need PostgreSQL - SQLite is the single-node embedded database: run one "
                "node with every role, or set database_url to a PostgreSQL database shared by every node"
            )
        others = session.execute(
            select(Node.name, Node.host, Node.pid, Node.state, Node.heartbeat_at).where(
                Node.holder != holder, Node.state == NodeState.ALIVE
            )
        ).all()
        live = [
            row for row in others
            if is_live(row.state, row.heartbeat_at, now=now, timeout_s=settings.node_timeout_seconds, host=row.host,
                       pid=row.pid)
        ]
        if sqlite and live:
            other = live[0]
            raise NodeRefusedError(
                f"another chexd node ({other.name}, {other.host} pid {other.pid}) is using this SQLite database - "
                "SQLite is single-node: stop it, or share a PostgreSQL database between nodes"
            )
        clash = [row for row in live if row.name == name and row.host != HOST]
        if clash:
            raise NodeRefusedError(
                f"node_name {name!r} is used by a live node on host {clash[0].host} - give each node its own "
                "node_name"
            )
        session.execute(
            Node.__table__.delete().where(
                Node.state != NodeState.ALIVE, Node.heartbeat_at < now - KEEP_ENDED
            )
        )
        row = session.scalar(select(Node).where(Node.holder == holder))
        values = {
            "name": name,
            "host": HOST,
            "pid": os.getpid(),
            "roles": ",".join(roles),
            "version": chexd_version(),
            "state": NodeState.ALIVE,
            "started_at": now,
            "heartbeat_at": now,
            "ended_at": None,
        }
        if row is None:
            session.add(Node(holder=holder, **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)
    log.info("node %s (%s) joined with roles %s", name, holder, ",".join(roles))
    return holder


def heartbeat(sessions: sessionmaker[Session], holder: str) -> bool:
    """Say that ``holder`` is alive (one UPDATE). False when its row was no longer ALIVE: another node declared it
    dead (it missed heartbeats for the node timeout: a stall, a network partition) and took over its work; the row
    is ALIVE again, and what this node still finishes of the lost work is refused by the lease fences."""
    with sessions.begin() as session:
        kept = session.execute(
            update(Node)
            .where(Node.holder == holder, Node.state == NodeState.ALIVE)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        if kept:
            return True
        session.execute(  # the time taken now, not before the first statement: a stalled process must not look older
            update(Node)
            .where(Node.holder == holder)
            .values(heartbeat_at=utcnow(), state=NodeState.ALIVE, ended_at=None)
            .execution_options(synchronize_session=False)
        )
    log.error("this node (%s) had been declared dead by another node and its work taken over; alive again", holder)
    return False


def sweep(sessions: sessionmaker[Session], holder: str, timeout_s: float) -> dict[str, Released]:
    """Take over every node other than ``holder`` whose heartbeat is older than ``timeout_s``: mark it DEAD and
    :func:`release` what it held, one transaction per dead node; returns {dead holder: what was released}. Two nodes
    sweeping at once take each dead node over once (the DEAD marking is conditional)."""
    limit = timedelta(seconds=timeout_s)
    dead = {}
    with sessions() as session:
        stale = session.scalars(
            select(Node.holder).where(
                Node.state == NodeState.ALIVE, Node.heartbeat_at < utcnow() - limit, Node.holder != holder
            )
        ).all()
    for other in stale:
        with sessions.begin() as session:
            now = utcnow()  # taken again: this process may have been stalled since the look-up
            cutoff = now - limit
            taken = session.execute(
                update(Node)
                .where(Node.holder == other, Node.state == NodeState.ALIVE, Node.heartbeat_at < cutoff)
                .values(state=NodeState.DEAD, ended_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not taken:
                continue
            dead[other] = released = release(session, other, now=now)
        log.warning(
            "node %s missed its heartbeats for %.0f s: declared dead; took over %d job(s), %d report(s), "
            "%d forward(s)", other, timeout_s, released.jobs, released.reports, released.forwards,
        )
    return dead


def leave(sessions: sessionmaker[Session], holder: str) -> Released:
    """At a clean stop: give back what is still held (work cut short by the stop) and mark the row STOPPED, so the
    other nodes take it at once rather than after the node timeout."""
    now = utcnow()
    with sessions.begin() as session:
        released = release(session, holder, now=now)
        session.execute(
            update(Node)
            .where(Node.holder == holder)
            .values(state=NodeState.STOPPED, ended_at=now, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
    if released:
        log.info("left the nodes table; gave back %d job(s), %d report(s), %d forward(s)",
                 released.jobs, released.reports, released.forwards)
    return released


def others_live(sessions: sessionmaker[Session], timeout_s: float) -> int:
    """How many live nodes other than this process use the database (start-up recovery is careful when any do)."""
    now, holder = utcnow(), this_holder()
    with sessions() as session:
        rows = session.execute(
            select(Node.host, Node.pid, Node.state, Node.heartbeat_at).where(
                Node.holder != holder, Node.state == NodeState.ALIVE
            )
        ).all()
    return sum(
        is_live(r.state, r.heartbeat_at, now=now, timeout_s=timeout_s, host=r.host, pid=r.pid) for r in rows
    )


def list_nodes(session: Session, timeout_s: float) -> list[dict[str, Any]]:
    """Every node row, newest start first, as JSON-able dicts: name, holder, host, pid, roles, version, state
    (alive/stopped/dead, or ``silent`` for an ALIVE row past the timeout that no node has swept yet), started_at,
    heartbeat age in seconds, and what it holds (RUNNING jobs, WRITING reports, claimed forwards)."""
    now = utcnow()
    jobs = _job_holdings(session)
    reports = {
        (note or "").removeprefix(WRITER_PREFIX): n
        for note, n in session.execute(
            select(StudyReportRow.error, func.count())
            .where(StudyReportRow.state == ReportState.WRITING)
            .group_by(StudyReportRow.error)
        )
    }
    forwards = dict(
        session.execute(
            select(Forward.claimed_by, func.count())
            .where(Forward.state == ForwardState.QUEUED, Forward.claimed_by.is_not(None))
            .group_by(Forward.claimed_by)
        ).all()
    )
    out = []
    for node in session.scalars(select(Node).order_by(Node.started_at.desc(), Node.id.desc())):
        state = NodeState(node.state).value
        if state == "alive" and node.heartbeat_at < now - timedelta(seconds=timeout_s):
            state = "silent"
        out.append(
            {
                "name": node.name,
                "holder": node.holder,
                "host": node.host,
                "pid": node.pid,
                "roles": node.roles.split(","),
                "version": node.version,
                "state": state,
                "started_at": node.started_at.isoformat(timespec="seconds"),
                "heartbeat_age_s": round((now - node.heartbeat_at).total_seconds(), 1),
                "holds": {
                    "jobs": jobs.get(node.holder, 0),
                    "reports": reports.get(node.holder, 0),
                    "forwards": forwards.get(node.holder, 0),
                },
            }
        )
    return out


def _job_holdings(session: Session) -> dict[str, int]:
    """RUNNING jobs per holder (``leased_by`` is ``holder/<thread>``)."""
    counts: dict[str, int] = {}
    for leased_by, n in session.execute(
        select(Job.leased_by, func.count())
        .where(Job.state == JobState.RUNNING, Job.leased_by.is_not(None))
        .group_by(Job.leased_by)
    ):
        holder = leased_by.rpartition("/")[0]
        counts[holder] = counts.get(holder, 0) + n
    return counts


__all__ = [
    "HOST",
    "KEEP_ENDED",
    "WRITER_PREFIX",
    "NodeRefusedError",
    "Released",
    "heartbeat",
    "is_live",
    "leave",
    "list_nodes",
    "node_name",
    "others_live",
    "pid_alive",
    "register",
    "release",
    "sweep",
    "this_holder",
]
