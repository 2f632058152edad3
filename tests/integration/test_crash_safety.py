"""Crash safety: kill -9 the daemon while storescu streams 300 files, restart, resend everything.

Every instance answered 0x0000 before the kill must be in the database and on disk; at the end there are exactly
300 instance rows, 300 files, 300 jobs and no temp files. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

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
