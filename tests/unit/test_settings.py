"""daemon.settings: embedded defaults, then the TOML file, then CHEXD_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.settings import DataDirError, Settings, SettingsError, ensure_data_dir, load_settings


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/nonexistent/ignored")  # environ= replaces the process environment
    settings = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert settings.ae_title == "CHEXD"
    assert settings.port == 11112
    assert settings.data_dir == tmp_path / "chexd"
    assert settings.database_url == ""
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'chexd' / 'chexd.db'}"
    assert settings.spool_dir == tmp_path / "chexd" / "spool"
    assert settings.quarantine_dir == tmp_path / "chexd" / "quarantine"
    assert settings.allowed_calling_aes == ()


def test_sqlite_default_follows_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path / "d")})
    assert settings.data_dir == tmp_path / "d"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'd' / 'chexd.db'}"


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'port = 104\nae_title = "RADIOLOGY"\njob_max_attempts = 5\n')
    settings = load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})
    assert (settings.port, settings.ae_title, settings.job_max_attempts) == (104, "RADIOLOGY", 5)
    assert settings.disk_reserve_mb == 1024  # untouched keys keep their defaults


def test_environment_overrides_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'port = 104\nae_title = "RADIOLOGY"\n')
    settings = load_settings(config, environ={"CHEXD_PORT": "4242", "CHEXD_DATA_DIR": str(tmp_path)})
    assert settings.port == 4242
    assert settings.ae_title == "RADIOLOGY"


def test_chexd_table_form_is_read(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "[chexd]\nport = 2104\nrequire_called_ae = false\n")
    settings = load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})
    assert settings.port == 2104
    assert settings.require_called_ae is False


def test_config_file_from_chexd_config_variable(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "elsewhere.toml", "port = 3104\n")
    settings = load_settings(environ={"CHEXD_CONFIG": str(config), "CHEXD_DATA_DIR": str(tmp_path / "d")})
    assert settings.port == 3104


def test_chexd_toml_in_data_dir_is_used_when_present(tmp_path: Path) -> None:
    write_toml(tmp_path / "chexd.toml", 'ae_title = "FROMDATADIR"\n')
    settings = load_settings(environ={"CHEXD_DATA_DIR": str(tmp_path)})
    assert settings.ae_title == "FROMDATADIR"


def test_unknown_toml_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = 104\nprot = 105\n")
    with pytest.raises(SettingsError, match="'prot'"):
        load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})


def test_unknown_key_in_chexd_table_is_an_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "[chexd]\nworkers = 4\n")
    with pytest.raises(SettingsError, match="'workers'"):
        load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_port_out_of_range_is_rejected(tmp_path: Path, port: str) -> None:
    with pytest.raises(SettingsError, match="port"):
        load_settings(environ={"CHEXD_PORT": port, "CHEXD_DATA_DIR": str(tmp_path)})


def test_non_numeric_port_is_rejected_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="'port'.*'eleven'"):
        load_settings(environ={"CHEXD_PORT": "eleven", "CHEXD_DATA_DIR": str(tmp_path)})


def test_boolean_port_in_toml_is_rejected(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = true\n")
    with pytest.raises(SettingsError, match="'port'"):
        load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize("ae_title", ["", "   ", "A" * 17, "BAD\\AE", "TAB\tAE"])
def test_invalid_ae_title_is_rejected(tmp_path: Path, ae_title: str) -> None:
    with pytest.raises(SettingsError, match="ae_title"):
        load_settings(environ={"CHEXD_AE_TITLE": ae_title, "CHEXD_DATA_DIR": str(tmp_path)})


def test_sixteen_character_ae_title_is_accepted() -> None:
    assert Settings(ae_title="A" * 16).ae_title == "A" * 16


def test_allowed_calling_aes_from_comma_separated_environment(tmp_path: Path) -> None:
    settings = load_settings(
        environ={"CHEXD_ALLOWED_CALLING_AES": "MODALITY1, PACS@10.0.0.5,,", "CHEXD_DATA_DIR": str(tmp_path)}
    )
    assert settings.allowed_calling_aes == ("MODALITY1", "PACS@10.0.0.5")


def test_allowed_calling_aes_from_toml_list(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'allowed_calling_aes = ["CR1", "DX2@192.168.1.9"]\n')
    settings = load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})
    assert settings.allowed_calling_aes == ("CR1", "DX2@192.168.1.9")


def test_invalid_allowed_calling_ae_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="allowed_calling_aes"):
        load_settings(environ={"CHEXD_ALLOWED_CALLING_AES": "A" * 17, "CHEXD_DATA_DIR": str(tmp_path)})


def test_masked_hides_postgresql_password() -> None:
    settings = Settings(database_url="postgresql+psycopg://chexd:s3cr3t-pw@db.example:5432/chexd")
    masked = settings.masked()
    assert "s3cr3t-pw" not in str(masked)
    assert masked["database_url"] == "postgresql+psycopg://chexd:***@db.example:5432/chexd"
    assert masked["port"] == 11112
    assert isinstance(masked["data_dir"], str)
    assert masked["allowed_calling_aes"] == []


def test_masked_shows_effective_sqlite_url(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).masked()["database_url"] == f"sqlite:///{tmp_path / 'chexd.db'}"


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="not found"):
        load_settings(missing, environ={"CHEXD_DATA_DIR": str(tmp_path)})


def test_missing_file_named_by_chexd_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(environ={"CHEXD_CONFIG": str(tmp_path / "nope.toml"), "CHEXD_DATA_DIR": str(tmp_path)})


def test_malformed_toml_is_an_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = = 1\n")
    with pytest.raises(SettingsError, match="Cannot read"):
        load_settings(config, environ={"CHEXD_DATA_DIR": str(tmp_path)})


def test_invalid_database_url_is_rejected() -> None:
    with pytest.raises(SettingsError, match="database_url"):
        Settings(database_url="not a url")


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "ERROR"])
def test_standard_log_levels_are_accepted(tmp_path: Path, level: str) -> None:
    assert load_settings(environ={"CHEXD_LOG_LEVEL": level, "CHEXD_DATA_DIR": str(tmp_path)}).log_level == level


def test_unknown_log_level_is_rejected(tmp_path: Path) -> None:
    # `chexd serve` passes log_level to logging.basicConfig, which raises a bare ValueError at start-up.
    with pytest.raises(SettingsError, match="log_level"):
        load_settings(environ={"CHEXD_LOG_LEVEL": "VERBOSE", "CHEXD_DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize("name", ["acse_timeout", "dimse_timeout", "network_timeout", "worker_poll_seconds"])
def test_negative_duration_is_rejected(tmp_path: Path, name: str) -> None:
    # a negative poll interval makes Event.wait() return at once: an idle worker would spin on the database
    with pytest.raises(SettingsError, match=name):
        load_settings(environ={f"CHEXD_{name.upper()}": "-1", "CHEXD_DATA_DIR": str(tmp_path)})


def test_model_threads_default_to_the_cores_the_report_workers_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert Settings(report_workers=2).effective_model_threads == 1
    assert Settings(report_workers=0).effective_model_threads == 2
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert Settings(report_workers=2).effective_model_threads == 14
    assert Settings(report_workers=2, model_threads=3).effective_model_threads == 3
    with pytest.raises(SettingsError, match="model_threads"):
        Settings(model_threads=-1)


# --- settings that used to pass 'chexd config' and fail later (issue 12) ---------------------------------------------


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ("CR01@999.1.1.1", "'999.1.1.1' is not an IP address or network"),  # crashed 'chexd serve' with a traceback
        ("CR01@", "'' is not an IP address or network"),
        ("CR01@10.0.0.0/33", "not an IP address or network"),
        ("CR01@host.example", "not an IP address or network"),
        ("@10.0.0.5", "AE title ''"),
    ],
)
def test_an_allowed_calling_ae_whose_address_is_no_ip_network_fails_at_load(
    tmp_path: Path, entry: str, rule: str
) -> None:
    with pytest.raises(SettingsError, match="allowed_calling_aes") as info:
        load_settings(environ={"CHEXD_ALLOWED_CALLING_AES": f"OK1,{entry}", "CHEXD_DATA_DIR": str(tmp_path)})
    assert repr(entry) in str(info.value) and rule in str(info.value) and "AE@IP/prefix" in str(info.value)


def test_allowed_calling_aes_take_ipv4_ipv6_addresses_and_networks() -> None:
    entries = ("CR1@10.0.0.5", "PACS@10.0.0.0/24", "V6@::1", "NET6@fd00::/8", "ANY")
    assert Settings(allowed_calling_aes=entries).allowed_calling_aes == entries


@pytest.mark.parametrize("value", ["999.1.1.1", "10.0.0", "no such host!", "-lead.example", "a" * 64 + ".example"])
def test_a_bind_address_that_is_neither_ip_nor_host_name_fails_at_load(value: str) -> None:
    with pytest.raises(SettingsError, match=r"Invalid bind_address .* must be an IP address .* or a host name"):
        Settings(bind_address=value)


@pytest.mark.parametrize("value", ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "pacs-01.example.org", ""])
def test_bind_address_takes_ips_host_names_and_empty(value: str) -> None:
    assert Settings(bind_address=value).bind_address == value


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("foo://u:pw@h/x", "backend 'foo' is not supported"),
        ("mysql://u:s3cret@h/x", "backend 'mysql' is not supported"),
        ("nonsense", "Could not parse"),
    ],
)
def test_a_database_url_for_no_supported_backend_fails_at_load_without_its_password(url: str, rule: str) -> None:
    with pytest.raises(SettingsError, match="database_url") as info:
        Settings(database_url=url)
    assert rule in str(info.value) and "s3cret" not in str(info.value) and "pw@" not in str(info.value)


def test_supported_database_urls_load() -> None:
    for url in ("sqlite:////var/lib/chexd/chexd.db", "postgresql://u:p@h/db", "postgresql+psycopg://u@h:5433/db"):
        assert Settings(database_url=url).database_url == url


def test_ensure_data_dir_creates_a_missing_folder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "chexd"
    assert ensure_data_dir(target) == target and target.is_dir()
    assert list(target.iterdir()) == [], "the write check's probe file is removed"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: Path("/proc/nope"), "cannot create it"),  # the probe's traceback
        (lambda tmp: _file(tmp / "file"), "it exists but is not a folder"),
        (lambda tmp: _file(tmp / "file") / "below", "cannot create it (Not a directory)"),
        (lambda tmp: Path("/proc/self"), "cannot write in it"),  # exists, not writable even by root
    ],
)
def test_an_unusable_data_dir_names_the_path_the_reason_and_the_fix(tmp_path: Path, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(DataDirError) as info:
        ensure_data_dir(path)
    message = str(info.value)
    assert f"Unusable data_dir {path}: {reason}" in message and "set CHEXD_DATA_DIR" in message
    assert isinstance(info.value, SettingsError), "the CLI exits 2 for it, as for any bad setting"


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def test_applicability_policy_defaults_to_withhold_and_is_validated(tmp_path: Path) -> None:
    assert Settings().applicability == "withhold"
    env = {"CHEXD_DATA_DIR": str(tmp_path)}
    assert load_settings(environ=env | {"CHEXD_APPLICABILITY": "flag"}).applicability == "flag"
    with pytest.raises(SettingsError, match="Invalid applicability 'ignore' - expected one of withhold, flag, off"):
        load_settings(environ=env | {"CHEXD_APPLICABILITY": "ignore"})
