"""Crash safety: kill -9 the daemon while storescu streams 300 files, restart, resend everything.

Every instance answered 0x0000 before the kill must be in the database and on disk; at the end there are exactly
300 instance rows, 300 files, 300 jobs and no temp files. Runs on SQLite and PostgreSQL.

And kill -9 while study reports are being written: no process of the daemon survives it, none writes afterwards, the
interrupted reports resume at start-up; SIGTERM stops the daemon within 10 s.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from daemon.store.tables import StudyReportRow
from model.phantom import generate, to_dicom
from tests.dicomgen import make_folder
from tests.integration.peers import counts, job_states, spool_files, temp_files

N = 300
KILL_AFTER = 120


def test_kill_9_mid_stream_loses_no_acknowledged_instance(make_daemon, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    files = make_folder(folder, N, rows=256, columns=256, seed=1000)
    uid_of = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    daemon = make_daemon()

    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port), "+sd", str(folder)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    acknowledged: list[str] = []
    current = None
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(uid_of[current])
            if len(acknowledged) == KILL_AFTER:
                daemon.kill9()
    proc.wait()
    assert len(acknowledged) >= KILL_AFTER
    assert len(acknowledged) < N, "the kill must land mid-stream"

    daemon.start()
    engine = daemon.engine()
    stored = set(job_states(engine))
    on_disk = {p.stem for p in spool_files(daemon.data_dir)}
    lost = [uid for uid in acknowledged if uid not in stored or uid not in on_disk]
    assert lost == [], f"{len(lost)} acknowledged instance(s) lost"
    assert temp_files(daemon.data_dir) == []

    result = daemon.storescu("+sd", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    assert counts(engine) == {"instances": N, "jobs": N}
    assert len(spool_files(daemon.data_dir)) == N
    assert set(job_states(engine)) == set(uid_of.values())
    assert temp_files(daemon.data_dir) == []


# --- report worker processes, resumption and SIGTERM -------------------------------------------------------------


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (children, grandchildren ...): pid -> its start time (to tell pid reuse)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        started[child] = fields[19]
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def _still_running(processes: dict[int, str]) -> list[int]:
    alive = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and fields[19] == start:
            alive.append(pid)
    return alive


def _report_states(engine) -> list[str]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return [str(s) for s in conn.execute(select(StudyReportRow.state).order_by(StudyReportRow.id)).scalars()]


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _studies(folder: Path, first: int, n: int) -> list[Path]:
    """``n`` phantoms, each its own study, with pleural effusion forced present (a report with a heatmap SC)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(first, first + n):
        ds = to_dicom(generate(0, index, size=384, force={"Effusion": True}))
        path = folder / f"phantom-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _report_files(data_dir: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in (data_dir / "reports").rglob("*") if p.is_file()}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_ends_the_report_workers_and_their_reports_resume_at_start_up(make_daemon, tmp_path: Path) -> None:
    """kill -9 while reports are being written: within seconds no process of the daemon is left and none writes a
    report file after the kill; the restarted daemon writes the interrupted reports at once (not after the 5-minute
    lease). Then SIGTERM while a report is being written: the daemon is gone within 10 s, its last line says so, and
    the report is PENDING for the next start, never FAILED."""
    daemon = make_daemon(report_quiet_seconds="0.2", model_device="cpu", report_workers="1", model="demo")
    engine = daemon.engine()
    batch = _studies(tmp_path / "batch", 0, 3)
    result = daemon.storescu(*map(str, batch))
    assert result.returncode == 0, result.stderr[-2000:]
    _wait(lambda: "WRITING" in _report_states(engine), 120, "a report being written")
    assert daemon.proc is not None
    processes = _descendants(daemon.proc.pid)
    assert len(processes) >= 2, "report worker processes (and multiprocessing's resource tracker)"

    daemon.kill9()
    killed_at = time.time()
    _wait(lambda: not _still_running(processes), 5, f"processes {_still_running(processes)} to end")
    print(f"kill -9: {len(processes)} processes of the daemon gone {time.time() - killed_at:.2f} s after the kill")
    time.sleep(1.0)
    late = {str(p): mtime - killed_at for p, mtime in _report_files(daemon.data_dir).items() if mtime > killed_at}
    assert late == {}, "report files written after the kill"
    interrupted = _report_states(engine).count("WRITING")
    assert interrupted >= 1

    offset = len(daemon.log())
    daemon.start()
    assert f"resumed {interrupted} report(s) left WRITING" in daemon.log()[offset:]
    _wait(lambda: _report_states(engine).count("DONE") == 3, 120, "every report, the interrupted ones included")
    assert not list((daemon.data_dir / "reports").glob("*/.r*.part")), "staging folders cleaned up"

    more = _studies(tmp_path / "more", 3, 2)
    assert daemon.storescu(*map(str, more)).returncode == 0
    _wait(lambda: "WRITING" in _report_states(engine), 60, "a report being written")
    processes = _descendants(daemon.proc.pid)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(30)
    took = time.monotonic() - started
    print(f"SIGTERM with a report being written: exited after {took:.2f} s")
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert daemon.log().rstrip().splitlines()[-1].split(": ", 1)[-1].startswith("chexd stopped")
    _wait(lambda: not _still_running(processes), 3, f"processes {_still_running(processes)} to end after SIGTERM")
    states = _report_states(engine)
    assert "FAILED" not in states and "WRITING" not in states, states
    assert "Traceback" not in daemon.log()
