"""The error family: every error daemon/ raises on purpose is a DaemonError (and keeps its builtin base), and each
maps to one CLI exit status (daemon.cli.exits) and one C-STORE status (daemon.edge.statuses)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from sqlalchemy.exc import OperationalError

import daemon
from daemon.cli.exits import cli_exit
from daemon.edge.intake import UnusableDatasetError
from daemon.edge.statuses import Status, store_status
from daemon.errors import DaemonError
from daemon.maintenance import MaintenanceError
from daemon.settings import SettingsError
from daemon.store.spool import DiskReserveError, InvalidUIDError
from model.errors import ImageTooLargeError, ModelError


def _daemon_error_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(daemon.__path__, "daemon."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and not cls.__name__.startswith("_"):
                found.append(cls)
    return found


def test_every_daemon_error_is_a_daemon_error() -> None:
    classes = _daemon_error_classes()
    assert len(classes) >= 15
    assert [c.__qualname__ for c in classes if not issubclass(c, DaemonError)] == []


def test_errors_keep_the_builtin_base_their_callers_catch() -> None:
    assert issubclass(SettingsError, ValueError) and issubclass(DiskReserveError, OSError)
    err = DiskReserveError(28, "below the disk reserve", "/spool")
    assert (err.errno, err.filename) == (28, "/spool")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SettingsError("port: 'x' is not a number"), 2),
        (MaintenanceError("--count and --chestxray14 conflict", usage=True), 2),
        (MaintenanceError("no validation images"), 1),
        (ModelError("weights do not match"), 1),
        (OperationalError("SELECT 1", {}, Exception("connection refused")), 1),
        (FileNotFoundError(2, "No such file or directory", "/nowhere.json"), 1),
    ],
)
def test_expected_errors_end_a_command_with_their_exit_status(exc: BaseException, code: int) -> None:
    outcome = cli_exit(exc, database="sqlite:///x.db")
    assert outcome is not None and outcome.code == code and outcome.message


def test_a_bug_is_not_an_expected_error() -> None:
    assert cli_exit(ZeroDivisionError("division by zero")) is None
    assert cli_exit(OSError("no filename: a bug, not a file the user named")) is None


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidUIDError("Invalid UID"), 0xC000),
        (UnusableDatasetError("no pixel data"), 0xC000),
        (ImageTooLargeError("too many pixels"), 0xC000),
        (DiskReserveError(28, "below the disk reserve"), 0xA700),
        (OperationalError("INSERT", {}, Exception("database is locked")), 0xA700),
        (KeyError("a bug"), 0x0110),
    ],
)
def test_each_refusal_has_one_c_store_status(exc: BaseException, status: int) -> None:
    assert store_status(exc) == Status(status)


def test_json_output_is_standard_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from daemon.cli.context import emit_json

    emit_json({"score": float("inf"), "rows": [1.5, float("nan")], "name": "x"})
    assert json.loads(capsys.readouterr().out) == {"score": None, "rows": [1.5, None], "name": "x"}


def test_read_only_commands_never_create_the_sqlite_database(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from daemon.cli import app

    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CHEXD_DATABASE_URL", raising=False)
    runner = CliRunner()
    status = runner.invoke(app, ["status"])
    assert status.exit_code == 1 and "no database yet" in status.output
    current = runner.invoke(app, ["db", "current", "--json"])
    assert current.exit_code == 0
    assert not list((tmp_path / "data").rglob("*.db")) and not list((tmp_path / "data").rglob("*.sqlite*"))
