"""The one settings object: embedded defaults, then a TOML file, then ``CHEXD_*`` environment variables.

Every command (``serve``, ``status``, ``db upgrade`` …) calls :func:`load_settings` so they all see the same values.
The TOML file is, in order of precedence: the ``--config`` option, ``$CHEXD_CONFIG``, ``<data_dir>/chexd.toml``
(used only when it exists). Keys in the file and the environment have the field names below
(``port = 104`` / ``CHEXD_PORT=104``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from daemon.errors import DaemonError

ENV_PREFIX = "CHEXD_"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash, no control chars
_DESTINATION = re.compile(r"^[^@]{1,16}@[A-Za-z0-9_.:\[\]-]+:\d{1,5}(\+tls)?$")  # +tls: DICOM TLS (daemon.edge.tls)
_TLS_CLIENT_CERT = ("auto", "none", "optional", "required")
APPLICABILITY_POLICIES = ("withhold", "flag", "off")
ROLES = ("scp", "worker", "reports", "forward")  # what a node does (chexd serve --role); default: all


class SettingsError(DaemonError, ValueError):
    """A setting has a value chexd cannot use; the message names the setting, the value and the rule."""

    exit_code = 2  # daemon.errors.SETTINGS_EXIT


class DataDirError(SettingsError):
    """The data folder cannot be created or written; the message names the path, the reason and what to do."""


# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*\.?$")


def _check_allowed_calling_ae(entry: str) -> None:
    """``AE`` or ``AE@IP`` or ``AE@IP/prefix`` (an IPv4 or IPv6 network); checked here so that ``chexd serve`` never
    meets an entry it cannot parse."""
    ae, at, address = entry.partition("@")
    rule = "expected 'AE', 'AE@IP' or 'AE@IP/prefix', e.g. 'CR01@10.0.0.5' or 'PACS@10.0.0.0/24'"
    if not _AE_TITLE.match(ae) or not ae.strip():
        raise SettingsError(f"Invalid allowed_calling_aes entry {entry!r} - AE title {ae!r}: {rule}")
    if at:
        try:
            ipaddress.ip_network(address.strip(), strict=False)
        except ValueError:
            raise SettingsError(
                f"Invalid allowed_calling_aes entry {entry!r} - {address!r} is not an IP address or network: {rule}"
            ) from None


def _check_bind_address(value: str) -> None:
    """An IP address, a host name, or empty (every interface)."""
    if not value:
        return
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    all_numeric = all(part.isdigit() for part in value.rstrip(".").split("."))
    if all_numeric or not _HOSTNAME.match(value):
        raise SettingsError(
            f"Invalid bind_address {value!r} - must be an IP address (e.g. 0.0.0.0, 127.0.0.1, ::) or a host name"
        )


def _check_database_url(value: str) -> None:
    """A URL SQLAlchemy parses, for a backend chexd supports (SQLite, PostgreSQL); the password never in the error."""
    try:
        url = make_url(value)
    except Exception as exc:
        raise SettingsError(
            f"Invalid database_url: {exc} - expected sqlite:////path/chexd.db or postgresql://user:password@host/db"
        ) from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise SettingsError(
            f"Invalid database_url {url.render_as_string(hide_password=True)!r} - backend "
            f"{url.get_backend_name()!r} is not supported: expected sqlite:///... or postgresql://..."
        )


def ensure_data_dir(path: Path) -> Path:
    """Create the data folder if missing and prove it writable (a probe file, created and removed at once).

    Raises DataDirError naming the path, why it is unusable (not a folder, cannot be created, read-only, no
    permission) and what to do. Every ``chexd`` command that reads settings calls it first."""
    fix = (f"set CHEXD_DATA_DIR (or data_dir in the configuration file) to a folder that user {_user()} can "
           "write, or fix that folder's permissions")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"Unusable data_dir {path}: it exists but is not a folder - {fix}") from None
    except OSError as exc:
        raise DataDirError(f"Unusable data_dir {path}: cannot create it ({exc.strerror or exc}) - {fix}") from None
    if not path.is_dir():
        raise DataDirError(f"Unusable data_dir {path}: it exists but is not a folder - {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".chexd-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataDirError(f"Unusable data_dir {path}: cannot write in it ({exc.strerror or exc}) - {fix}") from None
    return path


def _user() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError, AttributeError):
        return "this"


def _default_data_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chexd"


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Effective configuration of one chexd node.

    Sizes are in MiB, durations in seconds. ``allowed_calling_aes`` entries are ``AE`` or ``AE@IP``; an empty list
    admits any calling AE.
    """

    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str = ""  # empty: sqlite:///<data_dir>/chexd.db
    ae_title: str = "CHEXD"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    require_called_ae: bool = True
    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = 25
    max_connections_per_address: int = 10  # associations (and, separately, connections negotiating) per source IP
    association_request_timeout: float = 10.0  # from TCP accept to a complete A-ASSOCIATE-RQ (TLS handshake included)
    max_association_request_bytes: int = 65536  # longest A-ASSOCIATE-RQ PDU accepted; longer: A-ABORT and close
    max_pdu_size: int = 262144  # bytes we accept per P-DATA PDU; 0 = unlimited (PS3.8 D.1)
    disk_reserve_mb: int = 1024
    max_image_pixels: int = 100_000_000  # Rows x Columns x NumberOfFrames x SamplesPerPixel, checked before decoding
    max_decompressed_mb: int = 256  # decoded pixel data, and what a deflated dataset may inflate to
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    worker_threads: int = 1
    job_lease_seconds: int = 300
    job_max_attempts: int = 3
    worker_poll_seconds: float = 0.5
    log_level: str = "INFO"
    model_path: str = ""  # artifact manifest (or folder); empty: the bundled demo model, if this build has one
    model_device: str = "auto"  # auto | cpu | cuda | cuda:N
    model_batch_size: int = 16
    model_threads: int = 0  # CPU threads for inference; 0 = the cores left after the report workers (at least 1)
    report_quiet_seconds: float = 5.0  # a study is reported once no new image arrived for this long
    report_workers: int = 2  # processes that write report documents in parallel; 0 = in the report thread
    report_top_channels: int = 5  # channel evidence rows per positive finding
    exclusion_margin: float = 2.0  # partner's probability/threshold ratio must exceed the finding's by this factor
    # an image outside the model's validated domain (its applicability score above the artifact's threshold) or with
    # an input-quality issue: withhold = no findings, the report says why; flag = findings with a warning; off = no
    # check (no score stored)
    applicability: str = "withhold"
    forward_destinations: tuple[str, ...] = ()  # AE@host:port that receive the SR, SC and encapsulated PDF
    forward_max_attempts: int = 8
    forward_backoff_seconds: float = 2.0  # first retry delay; doubles per attempt, capped at 10 minutes
    # DICOM TLS (daemon.edge.tls, BCP 195 profile): PEM paths; tls_cert + tls_key turn TLS on for the SCP (TLS only)
    tls_cert: str = ""  # this node's certificate (chain); also the client certificate for '+tls' destinations
    tls_key: str = ""  # its private key (unencrypted PEM; protect it with file permissions)
    tls_ca: str = ""  # CA bundle that peers' certificates must chain to (clients at the SCP, '+tls' destinations)
    tls_client_cert: str = "auto"  # none | optional | required; auto: required when tls_ca is set, else none
    tls_verify_hostname: bool = True  # a '+tls' destination's certificate must name the host/IP dialled
    # several nodes on one PostgreSQL database (README "High availability"): what this node does, its name in the
    # nodes table (empty: the host name), how often it says it is alive, and after how long without a word another
    # node takes over what it held
    roles: tuple[str, ...] = ROLES
    node_name: str = ""
    heartbeat_seconds: float = 5.0
    node_timeout_seconds: float = 20.0

    @property
    def effective_model_threads(self) -> int:
        """CPU threads for inference: ``model_threads``, or when 0 the cores not taken by the report workers (at least
        1): a torch forward split over threads that compete with busy processes for the same cores waits for each
        preempted thread at every layer (2-core VM while another torch process ran: a DenseNet121 forward at 128 px
        took 45 ms with 1 thread, 4.5 s with 2)."""
        if self.model_threads:
            return self.model_threads
        return max(1, (os.cpu_count() or 1) - self.report_workers)

    def __post_init__(self) -> None:
        if not _AE_TITLE.match(self.ae_title) or not self.ae_title.strip():
            raise SettingsError(
                f"Invalid ae_title {self.ae_title!r} - must be 1-16 printable characters, no '\\'"
            )
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"Invalid port {self.port} - must be in 1..65535")
        if self.max_associations < 1:
            raise SettingsError(f"Invalid max_associations {self.max_associations} - must be >= 1")
        if self.max_connections_per_address < 1:
            raise SettingsError(
                f"Invalid max_connections_per_address {self.max_connections_per_address} - must be >= 1"
            )
        if not math.isfinite(self.association_request_timeout) or not 0 < self.association_request_timeout <= 600:
            raise SettingsError(
                f"Invalid association_request_timeout {self.association_request_timeout} - must be in (0, 600] seconds"
            )
        if not 1024 <= self.max_association_request_bytes <= 16 * 2**20:
            raise SettingsError(
                f"Invalid max_association_request_bytes {self.max_association_request_bytes} - must be in "
                "1024..16777216 bytes"
            )
        if self.max_pdu_size != 0 and not 4096 <= self.max_pdu_size <= 2**32 - 1:
            raise SettingsError(f"Invalid max_pdu_size {self.max_pdu_size} - 0 (unlimited) or 4096..4294967295 bytes")
        if self.disk_reserve_mb < 0:
            raise SettingsError(f"Invalid disk_reserve_mb {self.disk_reserve_mb} - must be >= 0")
        if self.max_image_pixels < 1:
            raise SettingsError(f"Invalid max_image_pixels {self.max_image_pixels} - must be >= 1 pixel")
        if not 1 <= self.max_decompressed_mb <= 65536:
            raise SettingsError(f"Invalid max_decompressed_mb {self.max_decompressed_mb} - must be in 1..65536 MiB")
        if self.worker_threads < 0:
            raise SettingsError(f"Invalid worker_threads {self.worker_threads} - must be >= 0")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise SettingsError(f"Invalid log_level {self.log_level!r} - expected DEBUG, INFO, WARNING or ERROR")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "worker_poll_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise SettingsError(f"Invalid {name} {value} - must be a positive number of seconds")
        if not 0 <= self.model_threads <= 256:
            raise SettingsError(f"Invalid model_threads {self.model_threads} - must be in 0..256 (0: automatic)")
        if self.model_batch_size < 1:
            raise SettingsError(f"Invalid model_batch_size {self.model_batch_size} - must be >= 1")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.model_device):
            raise SettingsError(f"Invalid model_device {self.model_device!r} - expected auto, cpu, cuda or cuda:N")
        if self.job_max_attempts < 1 or self.job_lease_seconds < 1:
            raise SettingsError("job_max_attempts and job_lease_seconds must be >= 1")
        if not math.isfinite(self.report_quiet_seconds) or self.report_quiet_seconds < 0:
            raise SettingsError(f"Invalid report_quiet_seconds {self.report_quiet_seconds} - must be >= 0 seconds")
        if not 0 <= self.report_workers <= 64:
            raise SettingsError(f"Invalid report_workers {self.report_workers} - must be in 0..64")
        if self.report_top_channels < 1:
            raise SettingsError(f"Invalid report_top_channels {self.report_top_channels} - must be >= 1")
        if not math.isfinite(self.exclusion_margin) or self.exclusion_margin < 1:
            raise SettingsError(f"Invalid exclusion_margin {self.exclusion_margin} - must be >= 1")
        if self.applicability not in APPLICABILITY_POLICIES:
            raise SettingsError(
                f"Invalid applicability {self.applicability!r} - expected one of {', '.join(APPLICABILITY_POLICIES)}"
            )
        if self.forward_max_attempts < 1:
            raise SettingsError(f"Invalid forward_max_attempts {self.forward_max_attempts} - must be >= 1")
        if not math.isfinite(self.forward_backoff_seconds) or self.forward_backoff_seconds <= 0:
            raise SettingsError(f"Invalid forward_backoff_seconds {self.forward_backoff_seconds} - must be > 0")
        for entry in self.forward_destinations:
            if not _DESTINATION.match(entry) or not _AE_TITLE.match(entry.split("@", 1)[0]):
                raise SettingsError(
                    f"Invalid forward_destinations entry {entry!r} - expected 'AE@host:port' or 'AE@host:port+tls', "
                    "e.g. 'PACS@10.0.0.5:104'"
                )
        self._check_tls()
        self._check_nodes()
        for entry in self.allowed_calling_aes:
            _check_allowed_calling_ae(entry)
        _check_bind_address(self.bind_address)
        if self.database_url:
            _check_database_url(self.database_url)

    def _check_tls(self) -> None:
        """TLS settings: cert and key both or neither, readable PEM files, the key matches the certificate, a
        client-certificate mode that the other settings can honour."""
        from daemon.edge.tls import TLSFileError, TLSPaths, check_files

        if self.tls_client_cert not in _TLS_CLIENT_CERT:
            raise SettingsError(
                f"Invalid tls_client_cert {self.tls_client_cert!r} - expected one of {', '.join(_TLS_CLIENT_CERT)}"
            )
        try:
            check_files(TLSPaths.from_settings(self))
        except TLSFileError as exc:
            raise SettingsError(str(exc)) from None
        if self.tls_client_cert in ("optional", "required"):
            if not self.tls_cert:
                raise SettingsError(
                    f"Invalid tls_client_cert {self.tls_client_cert!r} without tls_cert/tls_key - client "
                    "certificates need TLS on the SCP: set tls_cert and tls_key"
                )
            if not self.tls_ca:
                raise SettingsError(
                    f"Invalid tls_client_cert {self.tls_client_cert!r} without tls_ca - set tls_ca to the CA "
                    "bundle that client certificates must chain to"
                )

    def _check_nodes(self) -> None:
        """Roles: a non-empty subset of :data:`ROLES`; a node name of at most 64 printable characters; a heartbeat
        period and a node timeout of at least three heartbeats."""
        unknown = [role for role in self.roles if role not in ROLES]
        if unknown or not self.roles:
            raise SettingsError(
                f"Invalid roles {','.join(self.roles) or '(empty)'!r} - expected one or more of {', '.join(ROLES)}"
            )
        if len(self.node_name) > 64 or not self.node_name.isprintable():
            raise SettingsError(f"Invalid node_name {self.node_name!r} - at most 64 printable characters")
        if not math.isfinite(self.heartbeat_seconds) or not 0.1 <= self.heartbeat_seconds <= 600:
            raise SettingsError(f"Invalid heartbeat_seconds {self.heartbeat_seconds} - must be in 0.1..600 seconds")
        if not math.isfinite(self.node_timeout_seconds) or self.node_timeout_seconds < 3 * self.heartbeat_seconds:
            raise SettingsError(
                f"Invalid node_timeout_seconds {self.node_timeout_seconds} - must be at least 3 x heartbeat_seconds "
                f"({3 * self.heartbeat_seconds:g} s): a node is taken over only after missing several heartbeats"
            )

    @property
    def effective_tls_client_cert(self) -> str:
        """``none``, ``optional`` or ``required``: ``auto`` is required when ``tls_ca`` is set, else none."""
        if self.tls_client_cert != "auto":
            return self.tls_client_cert
        return "required" if self.tls_ca and self.tls_cert else "none"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'chexd.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    def masked(self) -> dict[str, Any]:
        """Settings as plain JSON-able values, with the database password replaced by ``***``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
        url = make_url(self.effective_database_url)
        out["database_url"] = url.render_as_string(hide_password=True)
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, raw: Any) -> Any:
    """Convert a TOML or environment value to the field's type; raise SettingsError naming the key."""
    kind = _FIELDS[name].type
    try:
        if kind == "Path":
            if not str(raw).strip():
                raise ValueError("expected a folder path, got an empty value")
            return Path(str(raw)).expanduser()
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            return tuple(str(p) for p in raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"Invalid value for {name!r}: {raw!r} - {exc}") from None


def load_settings(config_file: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build the effective settings. Raises SettingsError for an unknown key, a bad value or an unreadable file."""
    env = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}

    env_values: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in _FIELDS:
            env_values[name] = _coerce(name, raw)

    data_dir = env_values.get("data_dir") or _default_data_dir(env)
    values["data_dir"] = data_dir
    path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    explicit = path is not None
    if path is None:
        path = Path(data_dir) / "chexd.toml"
    if explicit or path.exists():
        try:
            with open(path, "rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError:
            raise SettingsError(f"Configuration file not found: {path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"Cannot read configuration file {path}: {exc}") from None
        file_values = file_values.get("chexd", file_values)
        for name, raw in file_values.items():
            if name not in _FIELDS:
                raise SettingsError(
                    f"Unknown setting {name!r} in {path} - known: {', '.join(sorted(_FIELDS))}"
                )
            values[name] = _coerce(name, raw)

    values.update(env_values)
    return Settings(**values)
