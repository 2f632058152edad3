"""High availability on PostgreSQL (issue 16): two SCP nodes and three worker/report nodes, separate ``chexd serve``
processes on one database and one data dir (the shared spool). 600 images in 120 studies go to both SCPs (some studies
to both); one worker node and one SCP node are killed with SIGKILL mid-way and nothing is restarted. Every acknowledged
image is reported exactly once, each study has one current report, no job stays RUNNING, and the dead node's work is
taken over within the node timeout (printed: the takeover time)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from daemon.store.tables import (
    Instance,
    Job,
    JobState,
    Node,
    NodeState,
    PredictionRow,
    ReportFile,
    ReportState,
    Series,
    Study,
    StudyReportRow,
)
from model.artifact import save_artifact
from model.types import LABELS, PreprocessRecipe
from tests.conftest import CHEXD, REPO, free_port, new_postgres_database, phi_in_log
from tests.dicomgen import make_dataset
from tests.nets import tiny

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDIES, PER_STUDY = 120, 5
HEARTBEAT, TIMEOUT = 1.0, 10.0  # seconds: a dead node is taken over 10-11 s after its last heartbeat (a busy 2-core CI
# machine stalls a process for seconds: a shorter timeout declares live nodes dead, which loses nothing but redoes work)
SETTINGS = {
    "heartbeat_seconds": str(HEARTBEAT),
    "node_timeout_seconds": str(TIMEOUT),
    "report_quiet_seconds": "2",
    "report_workers": "0",
    "worker_poll_seconds": "0.2",
    "model_device": "cpu",
    "model_threads": "1",
    "disk_reserve_mb": "0",
    "applicability": "off",
    "bind_address": "127.0.0.1",
    "log_level": "INFO",
}


@dataclass
class ChexdNode:
    """One ``chexd serve --role ...`` process on the shared data dir and database, with its own log."""

    name: str
    roles: str
    data_dir: Path
    database_url: str
    model_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
        values = dict(SETTINGS, data_dir=str(self.data_dir), database_url=self.database_url, port=str(self.port),
                      node_name=self.name, model_path=str(self.model_path))
        env.update({f"CHEXD_{k.upper()}": v for k, v in values.items()}, PYTHONUNBUFFERED="1")
        return env

    def start(self) -> ChexdNode:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*CHEXD, "serve", "--role", self.roles], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_started(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if f"chexd node {self.holder} started" in self.log():
                return
            time.sleep(0.3)
        raise AssertionError(f"{self.name} did not start:\n{self.log()[-3000:]}")

    @property
    def holder(self) -> str:
        assert self.proc is not None
        return f"{socket.gethostname()}/{self.proc.pid}"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def quiet_tiny() -> torch.nn.Module:
    """tests/unit/test_network.py's tiny DenseNet with its classifier scaled down and biased to -8: p < 0.001."""
    net = tiny(seed=3)
    with torch.no_grad():
        net.classifier.weight.mul_(0.01)
        net.classifier.bias.fill_(-8.0)
    return net


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DenseNet at 64 px that finds nothing (every logit near -8): reports without heatmap objects, fast to
    write."""
    return save_artifact(
        quiet_tiny(),
        tmp_path_factory.mktemp("model") / "tiny",
        name="tiny",
        preprocessing=PreprocessRecipe(input_size=64, resize=None),
        intended_use="synthetic demo model, not for diagnosis (test fixture)",
        synthetic=True,
        dtype="float32",
        thresholds=dict.fromkeys(LABELS, 0.5),
    )


@pytest.fixture
def cluster(tmp_path: Path, postgres_admin_url: str, tiny_model: Path) -> Iterator[dict[str, ChexdNode]]:
    url = new_postgres_database(postgres_admin_url)
    data = tmp_path / "data"
    nodes = {
        "scp-a": ChexdNode("scp-a", "scp", data, url, tiny_model),
        "scp-b": ChexdNode("scp-b", "scp", data, url, tiny_model),
        "work-1": ChexdNode("work-1", "worker,reports,forward", data, url, tiny_model),
        "work-2": ChexdNode("work-2", "worker,reports,forward", data, url, tiny_model),
        "work-3": ChexdNode("work-3", "worker,reports,forward", data, url, tiny_model),
    }
    for node in nodes.values():
        node.start()
    try:
        deadline = time.monotonic() + 180
        for node in nodes.values():
            node.wait_started(deadline)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        found = {name: phi_in_log(node.log()) for name, node in nodes.items() if phi_in_log(node.log())}
        assert found == {}, f"patient data in a node's log: {found}"


def make_studies() -> dict[str, list[Dataset]]:
    """120 studies of 5 images (64 x 64 DX), by Study Instance UID."""
    studies: dict[str, list[Dataset]] = {}
    for s in range(STUDIES):
        study_uid = f"1.2.826.0.1.3680043.10.511.16.{s + 1}"
        studies[study_uid] = [
            make_dataset(study_uid=study_uid, series_uid=f"{study_uid}.1", sop_uid=f"{study_uid}.1.{i + 1}",
                         instance_number=i + 1, seed=s * PER_STUDY + i)
            for i in range(PER_STUDY)
        ]
    return studies


@dataclass
class Sender:
    """Sends its images to one SCP, 25 per association; an image the SCP did not acknowledge (it died) is sent to the
    fallback SCP, as a modality retries another node behind a load balancer."""

    port: int
    fallback: int
    images: list[Dataset]
    acknowledged: dict[str, str]  # SOP Instance UID -> Study Instance UID
    lock: threading.Lock
    retried: int = 0

    def _send(self, port: int, batch: list[Dataset]) -> list[Dataset]:
        ae = AE(ae_title="HA-TEST")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="CHEXD")
        if not assoc.is_established:
            return batch
        failed = []
        try:
            for ds in batch:
                status = assoc.send_c_store(ds) if assoc.is_established else None
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    with self.lock:
                        self.acknowledged[ds.SOPInstanceUID] = ds.StudyInstanceUID
                else:
                    failed.append(ds)
        finally:
            if assoc.is_established:
                assoc.release()
        return failed

    def run(self) -> None:
        for start in range(0, len(self.images), 25):
            failed = self._send(self.port, self.images[start:start + 25])
            if failed:
                self.retried += len(failed)
                self.port = self.fallback  # this SCP is gone: the rest goes to the other one
                assert self._send(self.port, failed) == [], "the surviving SCP refused images"


def _wait(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _running_held_by(engine: Engine, holder: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Job).where(
            Job.state == JobState.RUNNING, Job.leased_by.startswith(holder + "/")))


def test_two_scps_three_workers_kill_9_one_of_each_no_image_lost_or_reported_twice(cluster) -> None:
    nodes = cluster
    engine = create_engine(nodes["scp-a"].database_url)
    studies = make_studies()
    uids = list(studies)
    to_a: list[Dataset] = []
    to_b: list[Dataset] = []
    for index, uid in enumerate(uids):
        for i, ds in enumerate(studies[uid]):
            if index % 6 == 0:  # a study across both SCPs
                (to_a if i % 2 == 0 else to_b).append(ds)
            else:
                (to_a if index % 2 == 0 else to_b).append(ds)
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    a = Sender(nodes["scp-a"].port, nodes["scp-a"].port, to_a, acknowledged, lock)
    b = Sender(nodes["scp-b"].port, nodes["scp-a"].port, to_b, acknowledged, lock)
    started = time.monotonic()
    threads = [threading.Thread(target=s.run) for s in (a, b)]
    for thread in threads:
        thread.start()

    # mid-way: kill -9 work-1 while it holds a job, and scp-b while it receives
    _wait(lambda: len(acknowledged) >= 250, 240, "half of the images acknowledged")
    victim = nodes["work-1"]
    held = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (held := _running_held_by(engine, victim.holder)):
        time.sleep(0.02)
    victim.kill9()
    killed_at = time.monotonic()
    nodes["scp-b"].kill9()
    print(f"\nkill -9 work-1 (holding {held} RUNNING job(s)) and scp-b after {killed_at - started:.1f} s, "
          f"{len(acknowledged)} images acknowledged")

    def declared_dead(holder: str) -> bool:
        with engine.connect() as conn:
            return conn.scalar(select(Node.state).where(Node.holder == holder)) == NodeState.DEAD.value

    takeover = _wait(lambda: declared_dead(victim.holder), 60, "work-1 declared dead")
    assert _running_held_by(engine, victim.holder) == 0
    print(f"takeover: work-1 declared dead and its work re-queued {takeover:.1f} s after kill -9 "
          f"(heartbeat {HEARTBEAT:g} s, node timeout {TIMEOUT:g} s)")
    _wait(lambda: declared_dead(nodes["scp-b"].holder), 60, "scp-b declared dead")

    for thread in threads:
        thread.join(240)
    assert not any(thread.is_alive() for thread in threads)
    print(f"sent: {len(acknowledged)} acknowledged, {a.retried + b.retried} resent to scp-a after scp-b died")
    assert len(acknowledged) == STUDIES * PER_STUDY

    def settled() -> bool:
        with engine.connect() as conn:
            open_jobs = conn.scalar(select(func.count()).select_from(Job).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING])))
            open_reports = conn.scalar(select(func.count()).select_from(StudyReportRow).where(
                StudyReportRow.state.in_([ReportState.PENDING, ReportState.WRITING])))
            done = conn.scalar(select(func.count()).select_from(StudyReportRow).where(
                StudyReportRow.state == ReportState.DONE))
        return open_jobs == 0 and open_reports == 0 and done == STUDIES

    waited = _wait(settled, 300, "every job done and every study reported")
    print(f"all reported {time.monotonic() - started:.1f} s after the first image ({waited:.1f} s after the last)")

    with engine.connect() as conn:
        jobs = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        assert jobs == {JobState.DONE.value: STUDIES * PER_STUDY}, jobs
        assert conn.scalar(select(func.count()).select_from(Instance)) == STUDIES * PER_STUDY
        predictions = conn.execute(select(PredictionRow.instance_id, func.count()).group_by(
            PredictionRow.instance_id)).all()
        assert len(predictions) == STUDIES * PER_STUDY and {n for _, n in predictions} == {1}
        current = conn.execute(
            select(Study.study_instance_uid, StudyReportRow.id, StudyReportRow.instance_uids)
            .join(StudyReportRow, StudyReportRow.study_id == Study.id)
            .where(StudyReportRow.state == ReportState.DONE)
        ).all()
        revisions = conn.scalar(select(func.count()).select_from(StudyReportRow))
        srs = dict(conn.execute(select(ReportFile.report_id, func.count()).where(ReportFile.kind == "sr")
                                .group_by(ReportFile.report_id)).all())
        series_per_study = conn.scalar(select(func.count(func.distinct(Series.study_id))))
    assert series_per_study == STUDIES
    by_study = {uid: (report_id, images) for uid, report_id, images in current}
    assert len(current) == len(by_study) == STUDIES, "one current report per study"
    expected: dict[str, list[str]] = {}
    for sop, study in acknowledged.items():
        expected.setdefault(study, []).append(sop)
    for study, (_report_id, images) in by_study.items():
        assert sorted(images) == sorted(expected[study]), f"study {study}: every image once in its current report"
    assert set(srs.values()) == {1}, "one SR per written revision: no revision written twice"
    print(f"{revisions} report revisions for {STUDIES} studies; {len(srs)} written")
