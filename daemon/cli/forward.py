"""``chexd forward``: the forwarding queue per destination, its dead letters, and ``--retry`` to re-queue them."""

from __future__ import annotations

import socket
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail, out
from daemon.settings import Settings


def print_summary(summary: dict[str, Any], console: Console = out, *, errors: bool = True) -> None:
    """Print :func:`daemon.work.forward.forward_summary` output: a table per destination, then dead letters and
    failing retries (``errors``). Prints nothing when no destination is configured and nothing was queued."""
    if not summary["destinations"]:
        return
    table = Table("destination", "queued", "retrying", "done", "dead", title="forwarding")
    for d in summary["destinations"]:
        name = d["destination"] + ("" if d["configured"] else " (not configured: not sent)")
        dead = f"[bold red]{d['DEAD']}[/]" if d["DEAD"] else "0"
        table.add_row(name, str(d["QUEUED"]), str(d["retrying"]), str(d["DONE"]), dead)
    console.print(table)
    if not errors:
        return
    if summary["dead"]:
        dead = Table("SOP Instance UID", "kind", "destination", "attempts", "error", "at", title="dead letters")
        for e in summary["dead"]:
            dead.add_row(
                e["sop_instance_uid"] or "", e["kind"], e["destination"], str(e["attempts"]), e["error"] or "", e["at"]
            )
        console.print(dead)
        console.print("re-send them with: chexd forward --retry", highlight=False)
    if summary["retrying"]:
        retrying = Table("SOP Instance UID", "kind", "destination", "attempts", "error", "next try", title="retrying")
        for e in summary["retrying"]:
            retrying.add_row(
                e["sop_instance_uid"] or "",
                e["kind"],
                e["destination"],
                str(e["attempts"]),
                e["error"] or "",
                e["next_try_at"],
            )
        console.print(retrying)


def daemon_listening(cfg: Settings, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on this node's DICOM port (a running ``chexd serve``)."""
    host = "127.0.0.1" if cfg.bind_address in ("0.0.0.0", "", "::") else cfg.bind_address
    try:
        with socket.create_connection((host, cfg.port), timeout=timeout):
            return True
    except OSError:
        return False


def forward(
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help="Re-queue dead letters (forwards that used every attempt) for an immediate try, attempts reset.",
        ),
    ] = False,
    include_retrying: Annotated[
        bool,
        typer.Option("--now", help="With --retry: also try at once the forwards waiting out a backoff."),
    ] = False,
    destination: Annotated[
        str | None, typer.Option("--destination", "-d", help="Only this destination (AE@host:port).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Forwarding of SR, SC and PDF results to the configured destinations: queue, dead letters, --retry."""
    from daemon.cli.context import emit_json, sessions, settings
    from daemon.work.forward import Destination, forward_summary, retry_dead  # pydicom, pynetdicom: when run

    if destination is not None:
        try:
            Destination.parse(destination)
        except ValueError as exc:
            fail(str(exc), 2)
    if include_retrying and not retry:
        fail("--now only goes with --retry", 2)
    cfg = settings()
    db = sessions(cfg)
    if retry:
        count = retry_dead(db, destination=destination, include_retrying=include_retrying)
        listening = daemon_listening(cfg)
        if json_out:
            emit_json({"requeued": count, "daemon_listening": listening})
            return
        what = "forward(s)" if include_retrying else "dead letter(s)"
        out.print(f"re-queued {count} {what}" + (f" to {destination}" if destination else ""), highlight=False)
        if count and listening:
            out.print(f"the daemon on port {cfg.port} sends them within seconds", highlight=False)
        elif count:
            out.print(f"no chexd is listening on port {cfg.port}: they wait until 'chexd serve' runs", highlight=False)
        return
    summary = forward_summary(db, configured=cfg.forward_destinations, destination=destination)
    if json_out:
        emit_json(summary)
        return
    if not summary["destinations"]:
        out.print(
            "nothing to forward: no destination configured (setting forward_destinations = ['AE@host:port'])"
            if destination is None
            else f"no forwards to {destination}",
            highlight=False,
        )
        return
    print_summary(summary)
