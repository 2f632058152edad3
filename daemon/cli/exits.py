"""The one place that turns an expected error into how a ``chexd`` command ends: an ``error:`` line and an exit
status (2: a setting, an option or the data folder; 1: the database, the model, a document, a file). The error
family: daemon.errors.DaemonError, model.errors.ModelError, reporting.errors.ReportError."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from daemon.errors import ERROR_EXIT, SETTINGS_EXIT, DaemonError
from daemon.settings import SettingsError
from daemon.store.db import DatabaseError
from model.errors import ModelError


@dataclass(frozen=True)
class CliExit:
    """How a command ends on an expected error: one ``error:`` line and this exit status."""

    code: int
    message: str


def cli_exit(exc: BaseException, *, database: str | None = None) -> CliExit | None:
    """The exit status and message for ``exc``, or None when it is not an expected error (a bug: re-raise it).

    ``database``: the configured database URL, password masked, named in a database error."""
    if isinstance(exc, SettingsError):
        return CliExit(SETTINGS_EXIT, str(exc))
    if isinstance(exc, (DatabaseError, OperationalError, InterfaceError, ArgumentError)):
        where = f" {database}" if database else ""
        reason = str(exc.args[0] if exc.args else exc).strip().splitlines()[0]
        return CliExit(ERROR_EXIT, f"cannot use the database{where}: {type(exc).__name__}: {reason} - check "
                                   "database_url and that the server is running")
    if isinstance(exc, ModelError):
        return CliExit(ERROR_EXIT, str(exc))
    if isinstance(exc, DaemonError):
        return CliExit(exc.exit_code, str(exc))
    if isinstance(exc, OSError) and exc.filename is not None:
        return CliExit(ERROR_EXIT, f"{exc.strerror or exc}: {exc.filename}")
    return None
