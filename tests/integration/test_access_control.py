"""Association access control and audit, and what the logs may carry. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from daemon.store.tables import AuditEvent
from tests.dicomgen import make_dataset, write_dataset


def _echo(daemon, aet: str = "ECHOSCU", aec: str | None = None) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "5", "-aet", aet, "-aec", aec or daemon.ae_title, "127.0.0.1", str(daemon.port)],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


def _rejections(daemon) -> list[AuditEvent]:
    with daemon.engine().connect() as conn:
        return list(conn.execute(select(AuditEvent).where(AuditEvent.event == "association_rejected")))


def _rejections_when(daemon, count: int) -> list[AuditEvent]:
    """The rejection rows once there are ``count`` of them: the edge writes audit rows from its own thread, after the
    peer has its answer (10 s at most, then what there is)."""
    deadline = time.monotonic() + 10
    while len(rows := _rejections(daemon)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


def test_wrong_called_ae_is_rejected_and_audited(daemon) -> None:
    assert not _echo(daemon, aec="NOTCHEXD")
    assert _echo(daemon)
    (event,) = _rejections_when(daemon, 1)
    assert event.called_ae == "NOTCHEXD" and "called AE" in event.detail and event.peer_address == "127.0.0.1"


def test_called_ae_check_can_be_switched_off(make_daemon) -> None:
    daemon = make_daemon(require_called_ae="false")
    assert _echo(daemon, aec="ANY-SCP")


def test_calling_ae_allow_list_with_source_ip(make_daemon) -> None:
    daemon = make_daemon(allowed_calling_aes="MODALITY1,PACS@127.0.0.0/8,FARAWAY@10.9.9.9")
    assert _echo(daemon, aet="MODALITY1")
    assert _echo(daemon, aet="PACS")
    assert not _echo(daemon, aet="INTRUDER")
    assert not _echo(daemon, aet="FARAWAY"), "right AE title from the wrong address"
    details = sorted(e.calling_ae for e in _rejections_when(daemon, 2))
    assert details == ["FARAWAY", "INTRUDER"]


def test_association_limit_rejects_and_audits(make_daemon) -> None:
    daemon = make_daemon(max_associations="1")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", daemon.port, ae_title=daemon.ae_title)
    assert held.is_established
    try:
        assert not _echo(daemon, aet="SECOND")
    finally:
        held.release()
    assert _echo(daemon, aet="THIRD"), "a released association frees its slot at once"
    deadline = time.monotonic() + 10  # the edge writes audit rows from its own thread
    while not any("association limit 1" in (e.detail or "") for e in _rejections(daemon)):
        assert time.monotonic() < deadline, [e.detail for e in _rejections(daemon)]
        time.sleep(0.1)


def test_logs_carry_uids_never_patient_names_or_ids(daemon, tmp_path: Path) -> None:
    ds = make_dataset(seed=1, patient_id="PID-SECRET-4711")
    ds.PatientName = "Doe^Janet"
    path = write_dataset(ds, tmp_path / "a.dcm")
    assert daemon.storescu(str(path)).returncode == 0
    daemon.stop()
    log = daemon.log()
    assert str(ds.SOPInstanceUID) in log
    assert "PID-SECRET-4711" not in log and "Doe" not in log and "Janet" not in log
