"""``chexd config``: the effective settings."""

from __future__ import annotations

from rich.table import Table

from daemon.cli.console import out
from daemon.cli.context import emit_json, settings
from daemon.cli.options import JsonOption


def config_cmd(as_json: JsonOption = False) -> None:
    """Print the effective settings (database password masked)."""
    values = settings().masked()
    if as_json:
        emit_json(values)
        return
    table = Table("setting", "value", title="effective settings")
    for key, value in values.items():
        table.add_row(key, str(value))
    out.print(table)
