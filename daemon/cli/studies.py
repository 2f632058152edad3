"""``chexd studies``: studies received, most recent first."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from daemon.cli.console import out
from daemon.cli.context import emit_json, sessions, settings
from daemon.cli.options import JsonOption
from daemon.store import queries


def studies(
    as_json: JsonOption = False, limit: Annotated[int, typer.Option(help="Most recent N studies.")] = 100
) -> None:
    """Studies received, most recent first."""
    rows = queries.list_studies(sessions(settings()), limit=limit)
    if as_json:
        emit_json(rows)
        return
    table = Table("Study Instance UID", "date", "series", "images", "jobs", "last received")
    for r in rows:
        jobs = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["jobs"].items()))
        table.add_row(
            r["study_instance_uid"],
            r["study_date"] or "",
            str(r["series"]),
            str(r["instances"]),
            jobs,
            r["last_received"] or "",
        )
    out.print(table)
