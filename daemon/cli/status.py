"""``chexd status``: queue by state, the last errors, free disk, forwarding."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.table import Table

from daemon.cli import forward as forward_cli
from daemon.cli.console import out
from daemon.cli.context import emit_json, sessions, settings
from daemon.cli.options import JsonOption
from daemon.store import queries


def status(as_json: JsonOption = False) -> None:
    """Queue by state, the last errors, and free disk in the spool."""
    cfg = settings()
    summary = queries.queue_summary(sessions(cfg), forward_destinations=cfg.forward_destinations,
                                    node_timeout_s=cfg.node_timeout_seconds)
    spool_root = cfg.spool_dir if cfg.spool_dir.exists() else cfg.data_dir
    usage = shutil.disk_usage(spool_root if spool_root.exists() else Path.cwd())
    summary["disk"] = {
        "path": str(spool_root),
        "free_mb": usage.free // 2**20,
        "reserve_mb": cfg.disk_reserve_mb,
        "below_reserve": usage.free < cfg.disk_reserve_mb * 2**20,
    }
    if as_json:
        emit_json(summary)
        return
    table = Table("state", "jobs", title=f"{summary['instances']} instances in {summary['studies']} studies")
    for state, count in summary["jobs"].items():
        table.add_row(state, str(count))
    held = summary["conflicts"]["held"]
    table.add_row("[bold red]CONFLICT[/]" if held else "CONFLICT", str(held))
    out.print(table)
    reports = summary.get("reports", {})
    if any(reports.values()):
        out.print("reports: " + ", ".join(f"{k.lower()} {v}" for k, v in reports.items() if v), highlight=False)
    gate = summary.get("applicability", {})
    if any(gate.values()):
        out.print("applicability (images): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in gate.items() if v)
                  + (" - withheld: outside the model's validated domain, no AI findings" if gate.get("withheld")
                     else ""), highlight=False)
    disk = summary["disk"]
    warn = " [bold red]BELOW RESERVE - new images are refused (0xA700)[/]" if disk["below_reserve"] else ""
    out.print(f"free disk: {disk['free_mb']} MiB (reserve {disk['reserve_mb']} MiB){warn}")
    forward_cli.print_summary(summary["forwards"], out)
    _print_nodes(summary["nodes"])
    if held:
        conflicts = Table(
            "SOP Instance UID", "Study Instance UID", "reason",
            title=f"{held} image(s) held by an identity conflict, never merged (README: Patient identity conflicts)",
        )
        for c in summary["conflicts"]["last"]:
            conflicts.add_row(c["sop_instance_uid"], c["study_instance_uid"], c["reason"])
        out.print(conflicts)
    if summary["last_errors"]:
        errors = Table("SOP Instance UID", "state", "attempts", "error", title="last errors")
        for e in summary["last_errors"]:
            errors.add_row(e["sop_instance_uid"], e["state"], str(e["attempts"]), e["error"] or "")
        out.print(errors)


def _print_nodes(nodes: list[dict]) -> None:
    """The nodes sharing the database (several with PostgreSQL): roles, heartbeat age, state, what each holds. Nodes
    that stopped cleanly are left out here (``--json`` lists them)."""
    nodes = [node for node in nodes if node["state"] != "stopped"]
    if not nodes:
        return
    table = Table("node", "host", "pid", "roles", "version", "heartbeat", "state", "jobs", "reports", "forwards",
                  title="nodes")
    colour = {"alive": "green", "silent": "bold red", "dead": "red", "stopped": "dim"}
    for node in nodes:
        holds, state = node["holds"], node["state"]
        table.add_row(node["name"], node["host"], str(node["pid"]), ",".join(node["roles"]), node["version"],
                      f"{node['heartbeat_age_s']:.0f} s ago", f"[{colour.get(state, 'white')}]{state}[/]",
                      str(holds["jobs"]), str(holds["reports"]), str(holds["forwards"]))
    out.print(table)
