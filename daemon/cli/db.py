"""``chexd db upgrade|current``: the database schema (Alembic)."""

from __future__ import annotations

import typer
from sqlalchemy.exc import SQLAlchemyError

from daemon.cli.console import fail, out
from daemon.cli.context import emit_json, missing_sqlite_file, settings
from daemon.cli.options import JsonOption
from daemon.store.db import DatabaseError, create_db_engine, current_revision, head_revision, upgrade_to_head

db_app = typer.Typer(help="Database schema (Alembic) commands.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all pending schema migrations."""
    cfg = settings()
    try:
        revision = upgrade_to_head(create_db_engine(cfg.effective_database_url))
    except (SQLAlchemyError, DatabaseError) as exc:
        fail(f"upgrade failed: {exc}")
    out.print(f"database {cfg.masked()['database_url']} at revision {revision} (head)", highlight=False)


@db_app.command("current")
def db_current(as_json: JsonOption = False) -> None:
    """Show the database's schema revision and the head revision."""
    cfg = settings()
    try:
        missing = missing_sqlite_file(cfg) is not None  # read-only: never create the file
        current = None if missing else current_revision(create_db_engine(cfg.effective_database_url))
    except (SQLAlchemyError, DatabaseError) as exc:
        fail(f"cannot read the database: {exc}")
    data = {"database_url": cfg.masked()["database_url"], "current": current, "head": head_revision()}
    if as_json:
        emit_json(data)
        return
    note = "" if current == data["head"] else "  (run 'chexd db upgrade')"
    out.print(f"current {current or '(empty)'}, head {data['head']}{note}", highlight=False)
