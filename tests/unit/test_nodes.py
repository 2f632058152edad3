"""The nodes table (daemon.store.nodes): registration and its refusals on SQLite, heartbeat, takeover of a dead node's
jobs, reports and forwards (exactly once), the report writer's fence, mark_pending across concurrent workers, and the
node settings. SQLite and PostgreSQL alike (the ``db_url`` fixture)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import ROLES, Settings, SettingsError
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.instances import record_instance
from daemon.store.nodes import (
    HOST,
    WRITER_PREFIX,
    NodeRefusedError,
    heartbeat,
    leave,
    list_nodes,
    register,
    sweep,
    this_holder,
)
from daemon.store.spool import Spool, SpooledFile
from daemon.store.tables import (
    Forward,
    ForwardState,
    Instance,
    Job,
    JobState,
    Node,
    NodeState,
    ReportFile,
    ReportState,
    Series,
    StudyReportRow,
    utcnow,
)
from daemon.work.reports import ReportLeaseLostError, ReportLoop, mark_pending
from tests.conftest import CHEXD, REPO, free_port
from tests.storegen import make_meta, rel_of

OTHER = "elsewhere.example/4242"  # a node on another host: only its heartbeat says whether it lives


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]
    settings: Settings
    spool: Spool

    @property
    def sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=head_db_url, disk_reserve_mb=0, report_workers=0)
    yield Env(engine, session_factory(engine), settings, Spool(settings.spool_dir, settings.quarantine_dir))
    engine.dispose()


def add_node(env: Env, holder: str, *, age_s: float, state: NodeState = NodeState.ALIVE, name: str = "other") -> None:
    host, _, pid = holder.partition("/")
    beat = utcnow() - timedelta(seconds=age_s)
    with env.sessions.begin() as session:
        session.add(Node(holder=holder, name=name, host=host, pid=int(pid), roles=",".join(ROLES), version="0.1.0",
                         state=state, started_at=beat, heartbeat_at=beat))


def add_instance(env: Env, n: int) -> tuple[int, int]:
    """Record instance ``n`` (study 1); return (job id, study id)."""
    meta = make_meta(n)
    rel = rel_of(meta)
    with env.sessions.begin() as session:
        instance_id = record_instance(
            session, meta, SpooledFile(relative_path=rel, absolute_path=env.spool.root / rel, size_bytes=128),
            calling_ae="MODALITY", fingerprint="none",
        )
        job_id = session.scalar(select(Job.id).where(Job.instance_id == instance_id))
        study_id = session.scalar(
            select(Series.study_id).join(Instance, Instance.series_id == Series.id).where(Instance.id == instance_id)
        )
    return job_id, study_id


def hold_everything(env: Env, holder: str) -> tuple[int, int, int]:
    """A RUNNING job, a WRITING report and a claimed forward held by ``holder``; returns their ids."""
    job_id, study_id = add_instance(env, 1)
    later = utcnow() + timedelta(minutes=5)
    with env.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.RUNNING, attempts=1, leased_by=f"{holder}/0", lease_expires_at=later))
        report = StudyReportRow(study_id=study_id, revision=1, state=ReportState.WRITING, due_at=later,
                                error=WRITER_PREFIX + holder)
        session.add(report)
        session.flush()
        file = ReportFile(report_id=report.id, kind="sr", path="reports/x/r1/sr.dcm", sha256="0" * 64)
        session.add(file)
        session.flush()
        forward = Forward(report_file_id=file.id, destination="PACS@127.0.0.1:104", attempts=1, available_at=later,
                          claimed_by=holder)
        session.add(forward)
        session.flush()
        return job_id, report.id, forward.id


def test_a_dead_nodes_work_is_taken_over_once_and_its_row_kept(env: Env) -> None:
    add_node(env, OTHER, age_s=60)
    job_id, report_id, forward_id = hold_everything(env, OTHER)
    dead = sweep(env.sessions, this_holder(), timeout_s=20)
    assert list(dead) == [OTHER]
    assert (dead[OTHER].jobs, dead[OTHER].reports, dead[OTHER].forwards) == (1, 1, 1)
    with env.sessions() as session:
        job = session.get(Job, job_id)
        report = session.get(StudyReportRow, report_id)
        forward = session.get(Forward, forward_id)
        node = session.scalar(select(Node).where(Node.holder == OTHER))
        assert (job.state, job.leased_by, job.attempts) == (JobState.QUEUED, None, 1)
        assert job.available_at <= utcnow()
        assert (report.state, report.error) == (ReportState.PENDING, None)
        assert report.due_at <= utcnow()
        assert (forward.state, forward.claimed_by) == (ForwardState.QUEUED, None)
        assert forward.available_at <= utcnow()
        assert node.state is NodeState.DEAD and node.ended_at is not None
    assert sweep(env.sessions, this_holder(), timeout_s=20) == {}, "a dead node is taken over once"


def test_a_node_within_its_timeout_keeps_what_it_holds(env: Env) -> None:
    add_node(env, OTHER, age_s=5)
    job_id, _, _ = hold_everything(env, OTHER)
    assert sweep(env.sessions, this_holder(), timeout_s=20) == {}
    with env.sessions() as session:
        assert session.get(Job, job_id).state is JobState.RUNNING


def test_two_nodes_sweeping_at_once_take_a_dead_node_over_once(env: Env) -> None:
    add_node(env, OTHER, age_s=60)
    hold_everything(env, OTHER)
    results: list[dict] = []
    barrier = threading.Barrier(2)

    def run(holder: str) -> None:
        barrier.wait()
        results.append(sweep(env.sessions, holder, timeout_s=20))

    threads = [threading.Thread(target=run, args=(h,)) for h in ("a.example/1", "b.example/2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r) for r in results) == [0, 1]


def test_register_heartbeat_leave(env: Env) -> None:
    holder = register(env.sessions, env.settings)
    assert holder == this_holder()
    with env.sessions() as session:
        node = session.scalar(select(Node).where(Node.holder == holder))
        assert (node.name, node.host, node.state, node.roles) == (HOST, HOST, NodeState.ALIVE, ",".join(ROLES))
        first = node.heartbeat_at
    assert heartbeat(env.sessions, holder) is True
    with env.sessions() as session:
        assert session.scalar(select(Node.heartbeat_at).where(Node.holder == holder)) >= first
    # declared dead by another node: the next heartbeat says so and makes the row alive again
    with env.sessions.begin() as session:
        session.execute(update(Node).where(Node.holder == holder).values(state=NodeState.DEAD))
    assert heartbeat(env.sessions, holder) is False
    with env.sessions() as session:
        assert session.scalar(select(Node.state).where(Node.holder == holder)) is NodeState.ALIVE
    leave(env.sessions, holder)
    with env.sessions() as session:
        assert session.scalar(select(Node.state).where(Node.holder == holder)) is NodeState.STOPPED
    assert register(env.sessions, env.settings) == holder, "a restart with the same holder takes its row over"
    with env.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Node)) == 1


def test_leave_gives_back_what_the_node_still_holds(env: Env) -> None:
    holder = register(env.sessions, env.settings)
    job_id, report_id, _ = hold_everything(env, holder)
    released = leave(env.sessions, holder)
    assert (released.jobs, released.reports, released.forwards) == (1, 1, 1)
    with env.sessions() as session:
        assert session.get(Job, job_id).state is JobState.QUEUED
        assert session.get(StudyReportRow, report_id).state is ReportState.PENDING


def test_sqlite_is_single_node_and_postgresql_is_not(env: Env) -> None:
    some = dataclasses.replace(env.settings, roles=("scp",))
    if env.sqlite:
        with pytest.raises(NodeRefusedError, match="need PostgreSQL"):
            register(env.sessions, some)
        add_node(env, OTHER, age_s=1)
        with pytest.raises(NodeRefusedError, match="single-node"):
            register(env.sessions, env.settings)
    else:
        add_node(env, OTHER, age_s=1)
        register(env.sessions, some)


def test_sqlite_accepts_a_restart_after_a_dead_or_silent_node(env: Env) -> None:
    add_node(env, f"{HOST}/999999", age_s=1)  # this host, a pid that does not exist: killed
    add_node(env, "elsewhere.example/7", age_s=3600)  # silent for an hour
    register(env.sessions, env.settings)


def test_a_node_name_in_use_on_another_host_is_refused(env: Env) -> None:
    add_node(env, OTHER, age_s=1, name="reader-1")
    # SQLite refuses any second live node first
    with pytest.raises(NodeRefusedError, match="single-node" if env.sqlite else "node_name 'reader-1' is used"):
        register(env.sessions, dataclasses.replace(env.settings, node_name="reader-1"))


def test_list_nodes_says_what_each_holds(env: Env) -> None:
    add_node(env, OTHER, age_s=60)
    hold_everything(env, OTHER)
    with env.sessions() as session:
        (node,) = list_nodes(session, timeout_s=20)
    assert node["state"] == "silent"  # past its timeout, not yet swept
    assert node["holds"] == {"jobs": 1, "reports": 1, "forwards": 1}
    assert node["heartbeat_age_s"] >= 59


def test_a_writer_whose_revision_was_taken_over_publishes_nothing(env: Env, tmp_path: Path) -> None:
    """A writer that stalled past the node timeout finds its revision taken over: it raises before renaming its
    staging folder into place, and records no file."""
    loop = ReportLoop(env.sessions, env.spool, env.settings)
    _, study_id = add_instance(env, 1)
    with env.sessions.begin() as session:
        report = StudyReportRow(study_id=study_id, revision=1, state=ReportState.PENDING, due_at=utcnow())
        session.add(report)
        session.flush()
        report_id = report.id
    assert loop.claim() == report_id
    with env.sessions.begin() as session:  # another node declared this one dead
        session.execute(update(StudyReportRow).where(StudyReportRow.id == report_id).values(
            state=ReportState.PENDING, error=None))
    staging, folder = tmp_path / ".r1.part", tmp_path / "r1"
    staging.mkdir()
    with pytest.raises(ReportLeaseLostError):
        loop._record(report_id, study_id, 1, [], [], staging, folder, [])
    assert staging.exists() and not folder.exists()
    with env.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ReportFile)) == 0
        assert session.get(StudyReportRow, report_id).state is ReportState.PENDING


def test_workers_marking_one_study_at_once_open_one_revision(env: Env) -> None:
    """Workers of several nodes finishing images of one study together: one PENDING revision, no duplicate."""
    _, study_id = add_instance(env, 1)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def mark() -> None:
        barrier.wait()
        try:
            with env.sessions.begin() as session:
                mark_pending(session, study_id, quiet_seconds=5, model_version="v1")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=mark) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with env.sessions() as session:
        rows = session.execute(select(StudyReportRow.revision, StudyReportRow.state)).all()
    if env.sqlite:  # one writer at a time: a worker that lost the race retries its job (busy), none duplicates
        assert len(rows) == 1
    else:
        assert errors == []
        assert rows == [(1, ReportState.PENDING)]


def test_an_image_after_the_claim_opens_the_next_revision(env: Env) -> None:
    _, study_id = add_instance(env, 1)
    with env.sessions.begin() as session:
        mark_pending(session, study_id, quiet_seconds=0, model_version="v1")
    loop = ReportLoop(env.sessions, env.spool, env.settings)
    assert loop.claim() is not None
    with env.sessions.begin() as session:
        mark_pending(session, study_id, quiet_seconds=5, model_version="v1")
    with env.sessions() as session:
        rows = sorted(session.execute(select(StudyReportRow.revision, StudyReportRow.state)).all())
    assert rows == [(1, ReportState.WRITING), (2, ReportState.PENDING)]


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        ({"roles": ("scp", "pacs")}, "Invalid roles"),
        ({"roles": ()}, "Invalid roles"),
        ({"heartbeat_seconds": 0}, "heartbeat_seconds"),
        ({"heartbeat_seconds": 10.0, "node_timeout_seconds": 20.0}, "at least 3 x heartbeat_seconds"),
        ({"node_name": "x" * 65}, "node_name"),
    ],
)
def test_node_settings_are_checked(values: dict, rule: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=rule):
        Settings(data_dir=tmp_path, **values)


def _health(env: Env, **values: object) -> dict[str, tuple[bool, str]]:
    from daemon.cli.health import health_checks

    settings = dataclasses.replace(env.settings, **values)  # type: ignore[arg-type]
    return {check.name: (check.ok, check.detail) for check in health_checks(settings)}


def test_health_is_ok_with_a_fresh_heartbeat_of_this_hosts_node_and_says_why_not(env: Env) -> None:
    env.settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert _health(env)["node"] == (False, f"no node named {HOST} on {HOST} has started (chexd serve)")
    parent = os.getppid()  # a live process of this host stands for the node (chexd health runs beside it)
    add_node(env, f"{HOST}/{parent}", age_s=1, name=HOST)
    with env.sessions.begin() as session:
        session.execute(update(Node).values(roles="worker,reports,forward"))
    checks = _health(env)
    assert {name: ok for name, (ok, _) in checks.items()} == {"database": True, "node": True, "disk": True}
    with env.sessions.begin() as session:
        session.execute(update(Node).values(roles="scp", heartbeat_at=utcnow() - timedelta(seconds=60)))
    checks = _health(env)
    assert checks["node"][0] is False and "last heartbeat 6" in checks["node"][1]
    assert "scp" not in checks, "the port is checked only for a live scp node"
    with env.sessions.begin() as session:
        session.execute(update(Node).values(heartbeat_at=utcnow()))
    checks = _health(env, port=free_port())
    assert checks["scp"][0] is False and "does not accept connections" in checks["scp"][1]
    assert _health(env, disk_reserve_mb=2**30)["disk"][0] is False


def test_health_fails_on_a_database_below_head(db_url: str, tmp_path: Path) -> None:
    from daemon.cli.health import health_checks

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, disk_reserve_mb=0)
    settings.data_dir.mkdir(parents=True)
    checks = {check.name: check for check in health_checks(settings)}
    assert not checks["database"].ok and "(empty)" in checks["database"].detail
    assert not checks["node"].ok


def test_serve_refuses_a_partial_role_on_sqlite_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
    env.update(CHEXD_DATA_DIR=str(tmp_path / "data"), CHEXD_PORT=str(free_port()), CHEXD_BIND_ADDRESS="127.0.0.1")
    result = subprocess.run([*CHEXD, "serve", "--role", "worker"], env=env, capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: roles worker need PostgreSQL" in result.stderr
    bad = subprocess.run([*CHEXD, "serve", "--role", "scp,pacs"], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2 and "Invalid --role 'scp,pacs'" in bad.stderr


def test_a_failing_heartbeat_is_one_error_line_then_one_line_when_it_works_again(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.work import heartbeat as module

    holder = register(env.sessions, env.settings)
    loop = module.HeartbeatLoop(env.sessions, env.settings, holder)
    real = module.heartbeat

    def full(*_args: object) -> bool:
        raise OSError(28, "database or disk is full")

    monkeypatch.setattr(module, "heartbeat", full)
    with caplog.at_level("INFO", logger="daemon.work.heartbeat"):
        assert loop.step(0) is False and loop.step(0) is False
        monkeypatch.setattr(module, "heartbeat", real)
        loop.step(0)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["ERROR", "INFO"], lines
    assert "disk is full" in lines[0][1] and not any(r.exc_info for r in caplog.records)
    assert loop.beats == 1
