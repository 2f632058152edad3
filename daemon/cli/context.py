"""What every command shares: the settings (global ``--config``, ``CHEXD_*``), the database, JSON output, TLS.
The shared options are in daemon/cli/options.py, the progress bar in progress.py, the maintenance calls in jobs.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import make_url
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


def missing_sqlite_file(cfg: Settings) -> Path | None:
    """The configured SQLite file when it does not exist yet (connecting would create it), else None."""
    url = make_url(cfg.effective_database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = Path(url.database)
    return None if path.is_file() else path


def sessions(cfg: Settings, *, migrate: bool = False):  # type: ignore[no-untyped-def]
    """A session factory for the configured database, which must be at the head revision. A read-only command
    (``migrate`` False) never creates a database: a SQLite file that does not exist yet ends it with exit 1."""
    missing = missing_sqlite_file(cfg)
    if not migrate and missing is not None:
        fail(f"no database yet at {missing} - start 'chexd serve' (or run 'chexd db upgrade') first")
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
    """Print ``data`` as standard JSON: a non-finite number (an infinite score, NaN) becomes null, never the
    ``Infinity``/``NaN`` tokens that strict parsers refuse."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def tls_client_context() -> Any:
    """The client TLS context from the settings (daemon.edge.tls.forward_context); fails with the reason."""
    from daemon.edge.tls import forward_context

    try:
        return forward_context(settings())
    except (OSError, ValueError) as exc:
        fail(f"cannot set up TLS: {exc}")
