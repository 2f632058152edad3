"""The ``chexd`` command line against a running daemon (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from daemon.cli import app
from daemon.settings import SettingsError
from model.errors import ModelError
from tests.conftest import CHEXD, REPO, free_port
from tests.dicomgen import make_dataset, make_folder, write_dataset
from tests.integration.peers import counts, wait_until_processed


def test_config_prints_effective_settings_with_password_masked(make_daemon) -> None:
    daemon = make_daemon(start=False)
    daemon.extra_env["CHEXD_DATABASE_URL"] = "postgresql://chexd:s3cret@db.example:5432/chexd"
    daemon.extra_env["CHEXD_AE_TITLE"] = "READER1"
    result = daemon.cli("config", "--json")
    values = json.loads(result.stdout)
    assert values["ae_title"] == "READER1" and values["port"] == daemon.port
    assert "s3cret" not in result.stdout and "***" in values["database_url"]
    assert "s3cret" not in daemon.cli("config").stdout


def test_bad_setting_exits_2_naming_it(make_daemon) -> None:
    daemon = make_daemon(start=False, port="eleven")
    result = daemon.cli("status", check=False)
    assert result.returncode == 2 and "'port'" in result.stderr and "eleven" in result.stderr


def test_commands_refuse_an_unmigrated_database_and_db_upgrade_fixes_it(make_daemon) -> None:
    daemon = make_daemon(start=False)
    result = daemon.cli("status", check=False)
    assert result.returncode == 1 and "chexd db upgrade" in result.stderr
    assert json.loads(daemon.cli("db", "current", "--json").stdout)["current"] is None
    daemon.cli("db", "upgrade")
    current = json.loads(daemon.cli("db", "current", "--json").stdout)
    assert current["current"] == current["head"]
    assert json.loads(daemon.cli("status", "--json").stdout)["instances"] == 0


def test_echo_reports_success_and_unreachable_nodes(daemon) -> None:
    ok = daemon.cli("echo", "127.0.0.1", str(daemon.port), "--aec", "CHEXD")
    assert "success" in ok.stdout
    down = daemon.cli("echo", "127.0.0.1", str(free_port()), "--timeout", "3", check=False)
    assert down.returncode == 1 and "no association" in down.stderr


def test_send_folder_then_status_studies_show_reprocess(daemon, tmp_path: Path) -> None:
    files = make_folder(tmp_path / "in" / "sub", 3, seed=5)
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    result = daemon.cli("send", str(tmp_path / "in"), "--json", check=False)
    assert result.returncode == 1, "one file was not DICOM"
    sent = json.loads(result.stdout)
    assert sorted(r["status"] or "none" for r in sent) == ["0x0000"] * 3 + ["none"]
    assert any("not a DICOM file" in (r["error"] or "") for r in sent)

    engine = daemon.engine()
    wait_until_processed(engine, 3)
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["jobs"]["DONE"] == 3 and status["disk"]["free_mb"] > 0

    studies = json.loads(daemon.cli("studies", "--json").stdout)
    assert len(studies) == 1 and studies[0]["instances"] == 3

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    shown = json.loads(daemon.cli("show", uid, "--json").stdout)
    assert shown["level"] == "instance" and shown["instances"][0]["job"]["state"] == "DONE"
    assert shown["instances"][0]["image_stats"]["rows"] == 64

    study_uid = studies[0]["study_instance_uid"]
    requeued = json.loads(daemon.cli("reprocess", study_uid, "--json").stdout)
    assert requeued == {"requeued": 3, "skipped": 0, "conflicts": 0}
    states = wait_until_processed(engine, 3)
    assert sorted(states.values()) == ["DONE"] * 3
    assert counts(engine) == {"instances": 3, "jobs": 3}, "reprocessing re-runs jobs, it does not duplicate them"

    missing = daemon.cli("show", "1.2.3.4.5", check=False)
    assert missing.returncode == 1 and "no study, series or instance with UID 1.2.3.4.5" in missing.stderr


def test_send_plain_output_and_exit_code(daemon, tmp_path: Path) -> None:
    path = write_dataset(make_dataset(seed=9), tmp_path / "one.dcm")
    result = daemon.cli("send", str(path))
    assert "sent 1 of 1 file(s)" in result.stdout
    nothing = daemon.cli("send", str(tmp_path / "missing"), check=False)
    assert nothing.returncode == 1 and "no such file or folder" in nothing.stderr


# --- clear errors for bad settings and unusable data folders, in every command (issue 12) ----------------------------

# Every command that reads the settings, with the arguments it needs to get that far. (echo, phantom, exclusions and
# train read no settings.)
COMMANDS = [
    ["serve"], ["config"], ["status"], ["studies"], ["show", "1.2.3"], ["reprocess", "1.2.3"],
    ["send", __file__], ["feedback", "1.2.3", "-f", "Effusion", "--present"], ["db", "upgrade"], ["db", "current"],
    ["model", "list"], ["model", "show", "1"], ["model", "activate", "1"], ["model", "rollback"],
    ["model", "import", __file__], ["forward"], ["calibrate"], ["correct", "-f", "Effusion", "--from-feedback"],
    ["finetune"],
    ["compress"], ["evaluate"], ["decide"], ["channels"],
]


def _chexd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m daemon`` with only ``env``'s CHEXD_* settings (fails before torch is imported when they are bad)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")} | env
    return subprocess.run([*CHEXD, *args], env=clean, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("kind", ["missing_under_proc", "a_file"])
def test_every_command_refuses_an_unusable_data_dir_with_exit_2_naming_it(tmp_path: Path, kind: str) -> None:
    data_dir = Path("/proc/nope") if kind == "missing_under_proc" else tmp_path / "file"
    if kind == "a_file":
        data_dir.write_text("not a folder")
    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(app, command, env={"CHEXD_DATA_DIR": str(data_dir)})
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert f"Unusable data_dir {data_dir}" in result.output and "set CHEXD_DATA_DIR" in result.output, command
        assert "Traceback" not in result.output, command


@pytest.mark.parametrize(
    ("setting", "value", "rule"),
    [
        ("ALLOWED_CALLING_AES", "CR01@999.1.1.1", "is not an IP address or network"),  # crashed 'serve' before
        ("BIND_ADDRESS", "999.1.1.1", "must be an IP address"),
        ("DATABASE_URL", "foo://x", "backend 'foo' is not supported"),
        ("DISK_RESERVE_MB", "-1", "must be >= 0"),
        ("PORT", "eleven", "invalid literal"),
        ("LOG_LEVEL", "LOUD", "expected DEBUG"),
    ],
)
def test_a_bad_setting_fails_config_status_and_serve_alike(tmp_path: Path, setting: str, value: str, rule: str) -> None:
    runner = CliRunner()
    env = {"CHEXD_DATA_DIR": str(tmp_path / "data"), f"CHEXD_{setting}": value}
    for command in (["config"], ["status"], ["serve"], ["model", "list"]):
        result = runner.invoke(app, command, env=env)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert setting.lower() in result.output and value in result.output and rule in result.output, command


def test_the_probe_cases_end_with_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    """Through the real entry point (a subprocess): what printed tracebacks in the issue-12 probe."""
    status = _chexd({"CHEXD_DATA_DIR": "/proc/nope"}, "status")
    assert status.returncode == 2 and "Traceback" not in status.stderr
    assert status.stderr.startswith("error: Unusable data_dir /proc/nope: cannot create it")
    serve = _chexd({"CHEXD_DATA_DIR": str(tmp_path / "d"), "CHEXD_ALLOWED_CALLING_AES": "CR01@999.1.1.1"}, "serve")
    assert serve.returncode == 2 and "Traceback" not in serve.stderr and "'CR01@999.1.1.1'" in serve.stderr
    port = free_port()  # nothing listens there
    unreachable = {"CHEXD_DATA_DIR": str(tmp_path / "d"),
                   "CHEXD_DATABASE_URL": f"postgresql://chexd:s3cret@127.0.0.1:{port}/chexd"}
    for command in (["status"], ["db", "upgrade"]):
        result = _chexd(unreachable, *command)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert "Connection refused" in result.stderr and "s3cret" not in result.stderr, command


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (OperationalError("SELECT 1", {}, Exception("server closed the connection")), 1,
         "cannot use the database sqlite:///"),
        (ModelError("model_path /x does not exist"), 1, "error: model_path /x does not exist"),
        (FileNotFoundError(2, "No such file or directory", "/data/x.dcm"), 1,
         "error: No such file or directory: /data/x.dcm"),
        (SettingsError("Invalid thing 3 - must be 4"), 2, "error: Invalid thing 3 - must be 4"),
    ],
)
def test_an_actionable_error_escaping_any_command_is_one_line_and_an_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception,
    code: int, message: str,
) -> None:
    """The top-level handler (daemon.cli.root._App, daemon.cli.exits) for what a command does not catch itself."""
    from daemon.cli import studies

    def raise_it(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(studies.queries, "list_studies", raise_it)
    monkeypatch.setattr(studies, "sessions", lambda *_a, **_k: None)
    with pytest.raises(SystemExit) as info:
        app(["studies"], prog_name="chexd")
    assert info.value.code == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    monkeypatch.setattr(studies.queries, "list_studies", lambda *_a, **_k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        app(["studies"], prog_name="chexd")
