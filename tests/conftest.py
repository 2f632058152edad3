"""Shared fixtures: databases (SQLite and a real PostgreSQL server), a chexd daemon run as a subprocess, one Orthanc
PACS per session and the session's trained or tiny models. tests/README.md says what each costs.

PostgreSQL: ``CHEXD_TEST_POSTGRES_URL`` (an admin URL, set by ``.ci/run``) names a running server; without it the
fixture starts a throw-away cluster with the installed PostgreSQL binaries. Neither available is a test failure,
not a skip: the suite promises PostgreSQL coverage. Each test gets its own database on the one server.

Daemons run a tiny random-weight model (tests/nets.py) unless a test asks for the bundled demo DenseNet121
(``make_daemon(model="demo")``, ``running_daemon(..., model="demo")``): tests of storage, networking and the CLI do
not need a model that finds anything, and the tiny one costs milliseconds per image instead of seconds.
"""

from __future__ import annotations

import atexit
import functools
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
from typing import TYPE_CHECKING, Literal

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from tests.integration.orthanc import OrthancServer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CXR = SHARED_DATA / "real-cxr"
CHEXD = [sys.executable, "-m", "daemon"]
Model = Literal["tiny", "demo"]


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


# A test whose fixtures include one of these is marked ``slow`` at collection (tests/README.md): make_daemon (and
# daemon, here and in test_disk_full/test_hostile_datasets), chexd (test_tls, test_hostile_network, test_identity) and
# syntax_daemon (test_storage_scp) start ``chexd serve`` subprocesses (5-10 s each, idle); grid_model trains a network
# (20-60 s, once per session). Name a new daemon fixture like these, or mark its tests ``slow`` yourself.
SLOW_FIXTURES = frozenset({"make_daemon", "daemon", "chexd", "syntax_daemon", "grid_model"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that uses a fixture in :data:`SLOW_FIXTURES`."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_thread() -> Iterator[None]:
    """Run this process's torch work on one intra-op thread (test modules that use torch imported it at collection;
    daemons and other subprocesses choose their own). The suite's networks are tiny: on a busy 2-core machine two
    OpenMP threads were measured 3x the CPU time and 2x the wall time of one (test_compress, load average 8)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def phi_in_log(text: str) -> list[str]:
    """The test patients' names and IDs found in ``text`` (a daemon's log)."""
    return [value for value in PHI_IN_TEST_DATA if value in text] + PHI_PATTERNS.findall(text)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it, so parallel workers do not collide)."""
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


def new_postgres_database(admin_url: str, template: str | None = None) -> str:
    """A new database on the server of ``admin_url`` (unique name), empty or a copy of database ``template`` (which
    nobody may be connected to); its URL."""
    name = f"chexd_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each supported kind (the ``postgresql`` case carries the ``postgres`` mark)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'chexd.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_admin_url"))


def _migrate(url: str) -> None:
    from daemon.store.db import create_db_engine, upgrade_to_head

    engine = create_db_engine(url)
    upgrade_to_head(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def _sqlite_at_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per session (the original that head_db_url copies)."""
    path = tmp_path_factory.mktemp("sqlite-head") / "chexd.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _postgres_at_head(postgres_admin_url: str) -> str:
    """Name of a PostgreSQL database migrated to head once per session (the template head_db_url copies)."""
    url = new_postgres_database(postgres_admin_url)
    _migrate(url)
    return str(make_url(url).database)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def head_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of each supported kind already at the newest migration: a copy of one migrated once per session
    (a file copy; CREATE DATABASE ... TEMPLATE), for tests of what runs on the schema rather than of the migrations
    (tests/migration and ``db_url`` test those). Saves the ~0.1 s (SQLite) / ~0.3-0.5 s (PostgreSQL) of migrating."""
    if request.param == "sqlite":
        path = tmp_path / "db" / "chexd.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(request.getfixturevalue("_sqlite_at_head"), path)
        return f"sqlite:///{path}"
    template = request.getfixturevalue("_postgres_at_head")
    return new_postgres_database(request.getfixturevalue("postgres_admin_url"), template=template)


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


@functools.cache
def tiny_model_path() -> Path:
    """Manifest of the tiny model artifact (tests/nets.py :func:`save_tiny_artifact`), written once per test process
    into a temp folder removed at exit."""
    from tests.nets import save_tiny_artifact  # torch: imported only by sessions that start a daemon

    folder = Path(tempfile.mkdtemp(prefix="chexd-tiny-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_tiny_artifact(folder / "tiny")


def daemon_env(settings: dict[str, str], model: Model) -> dict[str, str]:
    """``CHEXD_*`` variables for ``settings`` (``name=value``); ``model_path`` set to the tiny model unless ``model``
    is ``"demo"`` (the bundled demo) or ``settings`` names one."""
    if model not in ("tiny", "demo"):
        raise ValueError(f"model must be 'tiny' or 'demo', not {model!r}")
    if model == "tiny" and "model_path" not in settings:
        settings = {**settings, "model_path": str(tiny_model_path())}
    return {f"CHEXD_{k.upper()}": v for k, v in settings.items()}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny model's manifest (see :func:`tiny_model_path`); the model every test daemon runs by default."""
    return tiny_model_path()


@contextmanager
def running_daemon(
    data_dir: Path, database_url: str | None = None, *, model: Model = "tiny", **settings: str
) -> Iterator[DaemonProcess]:
    """Start one ``chexd serve`` (SQLite in ``data_dir`` unless ``database_url`` is given; ``settings`` as
    ``name=value``, e.g. ``report_workers="0"``; the tiny model unless ``model="demo"``) and stop it afterwards, with
    the log's PHI check. For module-scoped fixtures that run many cases against one daemon, which keeps the suite's
    daemon start-ups few."""
    daemon = DaemonProcess(
        data_dir=data_dir,
        database_url=database_url or f"sqlite:///{data_dir / 'chexd.db'}",
        port=free_port(),
        extra_env=daemon_env(settings, model),
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def make_daemon(tmp_path: Path, db_url: str) -> Iterator:
    """Factory: ``make_daemon(start=True, model="tiny", **settings)`` starts a daemon on the parametrised database
    (settings as ``name=value`` strings; ``model="demo"`` runs the bundled demo DenseNet121 instead of the tiny
    model); all are stopped at the end, each log checked for patient data."""
    started: list[DaemonProcess] = []

    def factory(start: bool = True, model: Model = "tiny", **env: str) -> DaemonProcess:
        daemon = DaemonProcess(
            data_dir=tmp_path / f"data{len(started)}",
            database_url=db_url,
            port=free_port(),
            extra_env=daemon_env(env, model),
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


# --- one Orthanc per session ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The session's Orthanc (started once, ~0.2 s); tests use :func:`orthanc`, which empties it first."""
    from tests.integration.orthanc import OrthancServer

    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(orthanc_server: OrthancServer) -> OrthancServer:
    """The session's Orthanc, empty: every patient (and so every study, series and instance) of earlier tests is
    deleted through the REST API before the test, so tests stay independent. Restarted if a test stopped it."""
    orthanc_server.start()
    orthanc_server.clear()
    return orthanc_server


# --- trained models, once per session ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def grid_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """(fp16 artifact manifest, injected channel) of tests/gridmodel.py's grid-line model, trained once per session
    (20-60 s of CPU) for the correction unit and CLI tests. Treat it as read-only."""
    from tests.gridmodel import save_grid_model

    return save_grid_model(tmp_path_factory.mktemp("grid") / "grid")
