"""``chexd serve``: upgrade the database, recover, then accept DICOM associations."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from daemon.cli.console import err, fail
from daemon.cli.context import settings
from daemon.settings import SettingsError
from daemon.store.db import DatabaseError

RoleOption = Annotated[
    str | None,
    typer.Option(
        "--role",
        help="What this node does, comma-separated: scp, worker, reports, forward (default: the roles setting, all). "
        "Anything but all needs PostgreSQL.",
    ),
]


def serve(role: RoleOption = None) -> None:
    """Run the daemon: upgrade the database, recover, then accept DICOM associations until SIGTERM/SIGINT."""
    cfg = settings()  # before importing the daemon (torch: seconds), so a bad setting fails at once
    if role is not None:
        try:
            cfg = dataclasses.replace(cfg, roles=tuple(r.strip() for r in role.split(",") if r.strip()))
        except SettingsError as exc:
            fail(str(exc).replace("Invalid roles", "Invalid --role"), 2)
    from daemon.service import Daemon, configure_logging

    configure_logging(cfg.log_level)
    try:
        daemon = Daemon(cfg)
    except (DatabaseError, OSError) as exc:
        fail(str(exc))
    err.print(
        f"chexd: AE title {cfg.ae_title}, port {cfg.port}, data in {cfg.data_dir}, "
        f"database {cfg.masked()['database_url']}, roles {','.join(cfg.roles)}",
        highlight=False,
    )
    try:
        daemon.serve_forever()
    except OSError as exc:
        where = "" if exc.filename else f" - listening on bind_address {cfg.bind_address!r}, port {cfg.port}"
        fail(f"cannot start: {exc}{where}")
    except SQLAlchemyError as exc:
        fail(f"database error at start-up: {exc}")
    except LookupError as exc:  # daemon.store.registry.RegistryError: the model to serve cannot be registered
        fail(f"cannot start: {exc}")
