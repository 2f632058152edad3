"""``chexd health``: whether this host's chexd node is healthy, for a service manager or a load balancer (exit 0
healthy, 1 not; ``--json`` for a machine). Reads only; never writes to the database or the data dir."""

from __future__ import annotations

import shutil
import socket
from dataclasses import asdict, dataclass
from typing import Any

import typer
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from daemon.cli.console import out
from daemon.cli.context import emit_json, settings
from daemon.cli.options import JsonOption
from daemon.settings import Settings
from daemon.store.db import create_db_engine, current_revision, head_revision, session_factory
from daemon.store.nodes import HOST, is_live, node_name
from daemon.store.tables import Node, utcnow

CONNECT_TIMEOUT = 2.0  # seconds for the SCP port to accept a TCP connection


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def _database(cfg: Settings) -> tuple[Check, list[Node] | None]:
    """The database answers and is at head; with it, the rows of this host's node (by name)."""
    engine = create_db_engine(cfg.effective_database_url)
    try:
        current, head = current_revision(engine), head_revision()
        if current != head:
            return Check("database", False, f"at revision {current or '(empty)'}, not {head}"), None
        with session_factory(engine)() as session:
            rows = list(session.scalars(select(Node).where(Node.name == node_name(cfg), Node.host == HOST)))
        return Check("database", True, f"reachable, at revision {head}"), rows
    except SQLAlchemyError as exc:
        reason = str(exc.args[0] if exc.args else exc).strip().splitlines()[0]
        return Check("database", False, f"cannot use {cfg.masked()['database_url']}: {reason}"), None
    finally:
        engine.dispose()


def _node(cfg: Settings, rows: list[Node] | None) -> tuple[Check, list[Node]]:
    name = node_name(cfg)
    if rows is None:
        return Check("node", False, f"node {name}: unknown (no database)"), []
    now = utcnow()
    live = [
        row for row in rows
        if is_live(row.state, row.heartbeat_at, now=now, timeout_s=cfg.node_timeout_seconds, host=row.host, pid=row.pid)
    ]
    if live:
        ages = ", ".join(f"pid {r.pid} {(now - r.heartbeat_at).total_seconds():.1f} s ago" for r in live)
        return Check("node", True, f"node {name} on {HOST}: heartbeat {ages}"), live
    if not rows:
        return Check("node", False, f"no node named {name} on {HOST} has started (chexd serve)"), []
    newest = max(rows, key=lambda r: r.heartbeat_at)
    age = (now - newest.heartbeat_at).total_seconds()
    return Check("node", False, f"node {name} on {HOST} is {newest.state} (pid {newest.pid}, last heartbeat "
                                f"{age:.0f} s ago; timeout {cfg.node_timeout_seconds:g} s)"), []


def _disk(cfg: Settings) -> Check:
    usage = shutil.disk_usage(cfg.data_dir)
    free_mb = usage.free // 2**20
    ok = usage.free >= cfg.disk_reserve_mb * 2**20
    state = "" if ok else " - below the reserve: new images are refused (0xA700)"
    return Check("disk", ok, f"{free_mb} MiB free in {cfg.data_dir} (reserve {cfg.disk_reserve_mb} MiB){state}")


def _scp(cfg: Settings) -> Check:
    host = cfg.bind_address if cfg.bind_address not in ("", "0.0.0.0", "::") else "127.0.0.1"
    try:
        with socket.create_connection((host, cfg.port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        return Check("scp", False, f"port {host}:{cfg.port} does not accept connections: {exc.strerror or exc}")
    return Check("scp", True, f"port {host}:{cfg.port} accepts connections")


def health_checks(cfg: Settings) -> list[Check]:
    """Database reachable and at head; this host's node (``node_name``, else the host name) heartbeating within
    ``node_timeout_seconds``; free disk above the reserve; the DICOM port accepting TCP connections when the node has
    the scp role (a TCP connect and close: no association, nothing audited)."""
    database, rows = _database(cfg)
    node, live = _node(cfg, rows)
    checks = [database, node, _disk(cfg)]
    if any("scp" in row.roles.split(",") for row in live):
        checks.append(_scp(cfg))
    return checks


def health(as_json: JsonOption = False) -> None:
    """Exit 0 when this host's chexd node is healthy (database at head, heartbeat fresh, disk above the reserve, DICOM
    port open for an scp node), 1 with the reasons otherwise. For systemd and load balancers."""
    cfg = settings()
    checks = health_checks(cfg)
    healthy = all(check.ok for check in checks)
    if as_json:
        result: dict[str, Any] = {"healthy": healthy, "node": node_name(cfg), "host": HOST,
                                  "checks": [asdict(check) for check in checks]}
        emit_json(result)
    else:
        for check in checks:
            mark = "[green]ok[/]  " if check.ok else "[bold red]FAIL[/]"
            out.print(f"{mark} {check.name}: {check.detail}", highlight=False)
        out.print("healthy" if healthy else "[bold red]unhealthy[/]", highlight=False)
    if not healthy:
        raise typer.Exit(1)
