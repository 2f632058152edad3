"""What every command shares: the settings (global ``--config``, ``CHEXD_*``), the database, JSON output, TLS."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.exc import SQLAlchemyError

from daemon.cli.console import fail
from daemon.settings import Settings, SettingsError, ensure_data_dir, load_settings
from daemon.store.db import (
    create_db_engine,
    current_revision,
    head_revision,
    session_factory,
    upgrade_to_head,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $CHEXD_CONFIG or <data_dir>/chexd.toml)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


TLS_HELP = "DICOM TLS: verify the peer with tls_ca, present tls_cert/tls_key (the settings forwarding uses)."


class _State:
    config: Path | None = None
    settings: Settings | None = None  # the last settings loaded: names the database in a top-level error


def settings() -> Settings:
    """The effective settings, with a usable data folder (created if missing). A bad setting or an unusable data
    folder ends the command with exit status 2 and a message naming the setting, the value and the rule."""
    try:
        cfg = load_settings(_State.config)
        ensure_data_dir(cfg.data_dir)
    except SettingsError as exc:
        fail(str(exc), 2)
    _State.settings = cfg
    return cfg


def sessions(cfg: Settings, *, migrate: bool = False):  # type: ignore[no-untyped-def]
    """A session factory for the configured database, which must be at the head revision."""
    engine = create_db_engine(cfg.effective_database_url)
    try:
        if migrate:
            upgrade_to_head(engine)
        else:
            current = current_revision(engine)
            if current != head_revision():
                fail(
                    f"database {cfg.masked()['database_url']} is at revision {current or '(empty)'}, "
                    f"not {head_revision()} - run 'chexd db upgrade' (or start 'chexd serve', which upgrades)"
                )
    except SQLAlchemyError as exc:
        reason = exc.args[0] if exc.args else exc
        fail(f"cannot use database {cfg.masked()['database_url']}: {exc.__class__.__name__}: {reason}")
    return session_factory(engine)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def tls_client_context() -> Any:
    """The client TLS context from the settings (daemon.edge.tls.forward_context); fails with the reason."""
    from daemon.edge.tls import forward_context

    try:
        return forward_context(settings())
    except (OSError, ValueError) as exc:
        fail(f"cannot set up TLS: {exc}")
