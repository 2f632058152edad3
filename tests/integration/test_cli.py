"""The ``chexd`` command line against a running daemon (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from tests.conftest import free_port
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
    assert json.loads(daemon.cli("reprocess", study_uid, "--json").stdout) == {"requeued": 3, "skipped": 0}
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
