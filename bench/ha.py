"""Several chexd nodes on one PostgreSQL database (issue 16): scale-out, takeover after ``kill -9``, and the database
round trips the nodes table adds per image.

    python -m bench.ha [--images 200] [--studies 40] [--database-url postgresql://admin@host/postgres] [--json]
                       [--skip throughput,takeover,roundtrips]

* throughput: one SCP node and 1, then 2 worker nodes (``--role worker,reports,forward``), separate ``chexd serve``
  processes on one fresh database and data dir; ``--images`` 64 x 64 DX images in ``--studies`` studies are sent to
  the SCP (pynetdicom, one association) and the clock runs from the first image sent to every job DONE and every study
  reported. Model: a tiny DenseNet at 64 px (tests/unit/test_network.py), so the figure is chexd's per-image work
  (store, claim, decode, predict, archive, report), not a large network's. Reported: images/s per configuration, the
  ratio 2 nodes / 1 node and the machine's CPU count (on a 2-core machine two nodes share the same cores).
* takeover: one SCP node and two worker nodes with the default heartbeat (5 s) and node timeout (20 s); one worker is
  killed with SIGKILL while it holds a job; reported: seconds from the kill until its row is DEAD and its jobs are
  back in the queue (a live node swept it), then until no job is left RUNNING.
* roundtrips: in-process on the same PostgreSQL, every SQL statement counted with a SQLAlchemy ``before_cursor_execute``
  listener while ``--images`` images are stored, processed and reported one at a time; the statements that exist only
  for several nodes (the study lock of mark_pending and of report publishing, the writer fence, the heartbeat and the
  sweep) are counted apart. Reported: statements per image in all and the extra ones, and the heartbeat's statements
  per node per second.

PostgreSQL: ``--database-url`` (an admin URL: each phase creates its own database), else a throw-away cluster is
started with the installed PostgreSQL binaries (as tests/conftest.py does). Progress goes to stderr, the table (or
``--json``) to stdout. Exit status 0 when every phase ran to its end, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _log(message: str) -> None:
    print(f"[bench.ha] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def postgres(admin_url: str | None) -> Iterator[str]:
    if admin_url:
        yield admin_url
        return
    from tests.conftest import postgres_admin_url

    generator = postgres_admin_url.__wrapped__()  # type: ignore[attr-defined]
    url = next(generator)
    try:
        yield url
    finally:
        with contextlib.suppress(StopIteration):
            next(generator)


def tiny_model(folder: Path) -> Path:
    from model.artifact import save_artifact
    from model.types import LABELS, PreprocessRecipe
    from tests.integration.test_ha import quiet_tiny

    return save_artifact(quiet_tiny(), folder / "tiny", name="tiny",
                         preprocessing=PreprocessRecipe(input_size=64, resize=None),
                         intended_use="synthetic demo model, not for diagnosis (benchmark)", synthetic=True,
                         dtype="float32", thresholds=dict.fromkeys(LABELS, 0.5))


def datasets(images: int, studies: int, tag: int) -> list[Any]:
    from tests.dicomgen import make_dataset

    per = max(1, images // studies)
    out = []
    for i in range(images):
        study = f"1.2.826.0.1.3680043.10.511.17.{tag}.{i // per + 1}"
        out.append(make_dataset(study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{i % per + 1}",
                                instance_number=i % per + 1, seed=i))
    return out


def send(port: int, items: list[Any]) -> int:
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXD")
    ok = 0
    try:
        for ds in items:
            status = assoc.send_c_store(ds)
            ok += int(getattr(status, "Status", None) == 0)
    finally:
        if assoc.is_established:
            assoc.release()
    return ok


def counts(url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        jobs = dict(conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
        reports = dict(conn.execute(text("SELECT state, count(*) FROM study_reports GROUP BY state")).all())
    engine.dispose()
    return {**{f"jobs_{k}": v for k, v in jobs.items()}, **{f"reports_{k}": v for k, v in reports.items()}}


def cluster(tmp: Path, url: str, model: Path, workers: int, **settings: str) -> dict[str, Any]:
    from tests.integration import test_ha

    test_ha.SETTINGS.update(settings)
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "data"
    nodes = {"scp": test_ha.ChexdNode("scp", "scp", data, url, model)}
    for i in range(workers):
        nodes[f"work-{i + 1}"] = test_ha.ChexdNode(f"work-{i + 1}", "worker,reports,forward", data, url, model)
    for node in nodes.values():
        node.start()
    deadline = time.monotonic() + 300
    for node in nodes.values():
        node.wait_started(deadline)
    return nodes


def throughput(admin: str, images: int, studies: int, tmp: Path, model: Path) -> list[dict[str, Any]]:
    from tests.conftest import new_postgres_database

    rows = []
    for workers in (1, 2):
        url = new_postgres_database(admin)
        nodes = cluster(tmp / f"w{workers}", url, model, workers, report_quiet_seconds="1")
        try:
            items = datasets(images, studies, workers)
            _log(f"throughput: {workers} worker node(s), sending {images} images")
            started = time.monotonic()
            sent = send(nodes["scp"].port, items)
            per = max(1, images // studies)
            n_studies = (images + per - 1) // per
            while True:
                c = counts(url)
                if c.get("jobs_DONE", 0) + c.get("jobs_FAILED", 0) >= sent and c.get("reports_DONE", 0) >= n_studies \
                        and not c.get("reports_PENDING") and not c.get("reports_WRITING"):
                    break
                if time.monotonic() - started > 1800:
                    raise RuntimeError(f"throughput run did not finish: {c}")
                time.sleep(0.2)
            seconds = time.monotonic() - started
        finally:
            for node in nodes.values():
                node.stop()
        rows.append({"worker_nodes": workers, "images": sent, "seconds": round(seconds, 1),
                     "images_per_s": round(sent / seconds, 2), "failed": c.get("jobs_FAILED", 0)})
        _log(f"  {rows[-1]}")
    return rows


def takeover(admin: str, tmp: Path, model: Path) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    from tests.conftest import new_postgres_database

    url = new_postgres_database(admin)
    nodes = cluster(tmp / "takeover", url, model, 2, heartbeat_seconds="5", node_timeout_seconds="20",
                    report_quiet_seconds="1")
    engine = create_engine(url)
    try:
        victim = nodes["work-1"]
        sender = threading.Thread(target=send, args=(nodes["scp"].port, datasets(400, 80, 9)))
        sender.start()
        held = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not held:
            with engine.connect() as conn:
                held = conn.scalar(text("SELECT count(*) FROM jobs WHERE state = 'RUNNING' AND leased_by LIKE :p"),
                                   {"p": victim.holder + "/%"})
        victim.kill9()
        killed = time.monotonic()
        _log(f"takeover: killed work-1 holding {held} job(s)")
        dead_after = requeued_after = None
        while time.monotonic() - killed < 120:
            with engine.connect() as conn:
                state = conn.scalar(text("SELECT state FROM nodes WHERE holder = :h"), {"h": victim.holder})
                running = conn.scalar(text("SELECT count(*) FROM jobs WHERE state = 'RUNNING' AND leased_by LIKE :p"),
                                      {"p": victim.holder + "/%"})
            if state == "dead" and dead_after is None:
                dead_after = time.monotonic() - killed
            if dead_after is not None and running == 0:
                requeued_after = time.monotonic() - killed
                break
            time.sleep(0.1)
        sender.join(300)
    finally:
        for node in nodes.values():
            node.stop()
        engine.dispose()
    return {"heartbeat_s": 5, "node_timeout_s": 20, "held_jobs": held,
            "declared_dead_after_s": None if dead_after is None else round(dead_after, 1),
            "jobs_requeued_after_s": None if requeued_after is None else round(requeued_after, 1)}


_EXTRA = [
    ("study lock", re.compile(r"FROM studies\s+WHERE studies\.id = \S+ FOR UPDATE", re.S)),
    ("writer fence", re.compile(r"UPDATE study_reports SET finished_at=[^,]*? WHERE .*study_reports\.error = ", re.S)),
    ("heartbeat/sweep", re.compile(r"\bnodes\b")),
]


def roundtrips(admin: str, images: int, studies: int, tmp: Path, model: Path) -> dict[str, Any]:
    """Statements per image through store -> job -> report, in one process, counted by a cursor listener."""
    from sqlalchemy import event

    from daemon.edge.intake import inspect
    from daemon.settings import Settings
    from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
    from daemon.store.instances import InstanceStore
    from daemon.store.nodes import heartbeat, register, sweep
    from daemon.store.registry import register_baseline
    from daemon.store.spool import Spool
    from daemon.work.inference import ActiveModelProcessor
    from daemon.work.reports import ReportLoop, ReportScheduler
    from daemon.work.worker import Worker, worker_identity
    from tests.conftest import new_postgres_database

    url = new_postgres_database(admin)
    settings = Settings(data_dir=tmp / "rt", database_url=url, model_path=str(model), model_device="cpu",
                        report_workers=0, report_quiet_seconds=0, disk_reserve_mb=0, applicability="off")
    engine = create_db_engine(url)
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    holder = register(sessions, settings)
    register_baseline(sessions, settings)
    processor = ActiveModelProcessor(settings, sessions)
    processor.load()
    spool = Spool(settings.spool_dir, settings.quarantine_dir)
    store = InstanceStore(spool, sessions)
    reports = ReportLoop(sessions, spool, settings)
    worker = Worker(sessions, spool, settings, identity=worker_identity(0), processor=processor,
                    sink=ReportScheduler(settings))
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite

    per = max(1, images // studies)
    for ds in datasets(images, studies, 5):
        buffer = DicomBytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        store.save(inspect(ds, str(ds.file_meta.TransferSyntaxUID)), buffer.getvalue(), "BENCH")
        while worker.run_one():
            pass
        if int(ds.InstanceNumber) == per:  # the study is complete: its report is due at once (quiet 0)
            while reports.run_one():
                pass
    work = list(statements)
    statements.clear()
    beats = 20
    for _ in range(beats):
        heartbeat(sessions, holder)
        sweep(sessions, holder, settings.node_timeout_seconds)
    beat = list(statements)
    engine.dispose()
    processor.close()
    extra = {name: sum(bool(pattern.search(s)) for s in work) for name, pattern in _EXTRA}
    return {
        "images": images,
        "statements_per_image": round(len(work) / images, 2),
        "extra_per_image": {k: round(v / images, 2) for k, v in extra.items()},
        "extra_total_per_image": round(sum(extra.values()) / images, 2),
        "heartbeat_statements_per_beat": round(len(beat) / beats, 2),
        "heartbeat_statements_per_node_per_s": round(len(beat) / beats / settings.heartbeat_seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--database-url", default=os.environ.get("CHEXD_TEST_POSTGRES_URL"))
    parser.add_argument("--skip", default="", help="comma-separated phases to skip")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    load = os.getloadavg()
    result: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                              "load_at_start": [round(x, 2) for x in load]}
    with tempfile.TemporaryDirectory(prefix="chexd-bench-ha-") as folder, postgres(args.database_url) as admin:
        tmp = Path(folder)
        model = tiny_model(tmp)
        if "roundtrips" not in skip:
            result["roundtrips"] = roundtrips(admin, min(args.images, 100), min(args.studies, 20), tmp, model)
            _log(f"roundtrips: {result['roundtrips']}")
        if "throughput" not in skip:
            result["throughput"] = throughput(admin, args.images, args.studies, tmp, model)
        if "takeover" not in skip:
            result["takeover"] = takeover(admin, tmp, model)
            _log(f"takeover: {result['takeover']}")
    result["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['cpus']} CPUs; load average at start {result['load_at_start']}, "
          f"at end {result['load_at_end']}")
    if "throughput" in result:
        rows = result["throughput"]
        print("| worker nodes | CPUs | images | seconds | images/s |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['worker_nodes']} | {result['cpus']} | {row['images']} | {row['seconds']} | "
                  f"{row['images_per_s']} |")
        print(f"ratio 2/1 nodes: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}")
    if "takeover" in result:
        t = result["takeover"]
        print(f"takeover after kill -9 (heartbeat {t['heartbeat_s']} s, timeout {t['node_timeout_s']} s): declared "
              f"dead after {t['declared_dead_after_s']} s, its {t['held_jobs']} job(s) back in the queue after "
              f"{t['jobs_requeued_after_s']} s")
    if "roundtrips" in result:
        r = result["roundtrips"]
        print(f"statements per image: {r['statements_per_image']}, of which for several nodes: "
              f"{r['extra_total_per_image']} {r['extra_per_image']}; heartbeat+sweep: "
              f"{r['heartbeat_statements_per_beat']} statements per beat = "
              f"{r['heartbeat_statements_per_node_per_s']} per node per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
