"""Shared fixtures: databases (SQLite and a real PostgreSQL server) and a chexd daemon run as a subprocess.

PostgreSQL: ``CHEXD_TEST_POSTGRES_URL`` (an admin URL, set by ``.ci/run``) names a running server; without it the
fixture starts a throw-away cluster with the installed PostgreSQL binaries. Neither available is a test failure,
not a skip: the suite promises PostgreSQL coverage.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CXR = SHARED_DATA / "real-cxr"
CHEXD = [sys.executable, "-m", "daemon"]


# Patient names and IDs that the suite's datasets carry - tests/dicomgen.py's defaults, the phantom's (model/phantom.py:
# PHANTOM^PH<seed>-<8 digits>) and those tests set, the hostile ones included. None may appear in a daemon's log
# (DESIGN: logs carry UIDs, never patient names or IDs); DaemonProcess.stop checks every daemon's log.
PHI_IN_TEST_DATA = (
    "CHEXD-TEST-0001", "Test^Chest", "19700101",  # dicomgen defaults (ID, name, birth date)
    "CHEXD-FWD-0001",  # test_forward
    "IDT-7731-A", "IDT-7731-B", "IDT-7731-C", "ROE^RICHARD", "DOE^JANE",  # test_identity
    "PID-SECRET-4711", "Doe^Janet",  # test_access_control
    "Yamada^Tarou", "山田", "太郎",  # test_hostile_datasets (ISO 2022 IR 87)
    # test_phi_logs (hostile names, daemon/logsafety.py)
    "MUSTERMANN", "Dr Who", "PHI-ID-123", "Иванов", "Παπαδόπουλος", "鈴木", "一郎", "LANGERNAME",
)
PHI_PATTERNS = re.compile(r"PHANTOM\^|\bPH\d+-\d{8}\b")


def phi_in_log(text: str) -> list[str]:
    """The test patients' names and IDs found in ``text`` (a daemon's log)."""
    return [value for value in PHI_IN_TEST_DATA if value in text] + PHI_PATTERNS.findall(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise RuntimeError(f"PostgreSQL's {name} not found - install the 'postgresql' package (bash .ci/run does)")


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """Admin URL of a real PostgreSQL server (from .ci/run, or a private cluster started here)."""
    url = os.environ.get("CHEXD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    root = Path(tempfile.mkdtemp(prefix="chexd-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    data = root / "data"
    subprocess.run(
        [*as_postgres, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start",
         "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_postgres_database(admin_url: str) -> str:
    name = f"chexd_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each supported kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'chexd.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_admin_url"))


@dataclass
class DaemonProcess:
    """A ``chexd serve`` subprocess with its own data dir, port and database."""

    data_dir: Path
    database_url: str
    port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    ae_title: str = "CHEXD"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
        env.update(
            CHEXD_DATA_DIR=str(self.data_dir),
            CHEXD_DATABASE_URL=self.database_url,
            CHEXD_PORT=str(self.port),
            CHEXD_BIND_ADDRESS="127.0.0.1",
            CHEXD_DISK_RESERVE_MB="0",
            CHEXD_WORKER_POLL_SECONDS="0.2",
            # The applicability gate is off for the suite's daemons: most send tests/dicomgen.py images (synthetic,
            # not chest-like) and test other behaviour (storage, reports, forwarding), which a withheld image would
            # hide. tests/integration/test_applicability.py runs the gate (default withhold, flag, off) end to end;
            # a test passes applicability="withhold" to running_daemon()/make_daemon() to get it.
            CHEXD_APPLICABILITY="off",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 60) -> DaemonProcess:
        offset = len(self.log())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*CHEXD, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chexd exited with {self.proc.returncode}:\n{self.log()}")
            if f"storage SCP listening ae_title={self.ae_title} port={self.port}" in self.log()[offset:]:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"chexd did not start listening within {timeout}s:\n{self.log()}")

    def echo(self) -> bool:
        result = subprocess.run(
            ["echoscu", "-to", "5", "-aec", self.ae_title, "127.0.0.1", str(self.port)], capture_output=True
        )
        return result.returncode == 0

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 30 s); then fail if the log names a test patient (:func:`phi_in_log`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        found = phi_in_log(self.log())
        if found:
            raise AssertionError(f"patient data in the daemon log {self.log_path}: {sorted(set(found))}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*CHEXD, *args], env=self.env, capture_output=True, text=True, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"chexd {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def storescu(self, *args: str, aec: str | None = None) -> subprocess.CompletedProcess[str]:
        """dcmtk storescu to this daemon; ``args`` are options and files (``-R`` sends files in their own syntax)."""
        return subprocess.run(
            ["storescu", "-v", "-aec", aec or self.ae_title, "127.0.0.1", str(self.port), *args],
            capture_output=True,
            text=True,
        )

    def engine(self):  # type: ignore[no-untyped-def]
        from daemon.store.db import create_db_engine

        return create_db_engine(self.database_url)


@contextmanager
def running_daemon(data_dir: Path, database_url: str | None = None, **settings: str) -> Iterator[DaemonProcess]:
    """Start one ``chexd serve`` (SQLite in ``data_dir`` unless ``database_url`` is given; ``settings`` as
    ``name=value``, e.g. ``report_workers="0"``) and stop it afterwards, with the log's PHI check. For module-scoped
    fixtures that run many cases against one daemon, which keeps the suite's daemon start-ups few."""
    daemon = DaemonProcess(
        data_dir=data_dir,
        database_url=database_url or f"sqlite:///{data_dir / 'chexd.db'}",
        port=free_port(),
        extra_env={f"CHEXD_{k.upper()}": v for k, v in settings.items()},
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def make_daemon(tmp_path: Path, db_url: str) -> Iterator:
    """Factory: ``make_daemon(**env)`` starts a daemon on the parametrised database; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def factory(start: bool = True, **env: str) -> DaemonProcess:
        daemon = DaemonProcess(
            data_dir=tmp_path / f"data{len(started)}",
            database_url=db_url,
            port=free_port(),
            extra_env={f"CHEXD_{k.upper()}": v for k, v in env.items()},
        )
        started.append(daemon)
        return daemon.start() if start else daemon

    yield factory
    errors = []
    for daemon in started:
        try:
            daemon.stop()
        except AssertionError as exc:  # stop them all first
            errors.append(str(exc))
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def daemon(make_daemon) -> DaemonProcess:  # type: ignore[no-untyped-def]
    return make_daemon()
