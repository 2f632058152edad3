"""Hostile peers at the network edge against one ``chexd serve`` (SQLite): floods, malformed first PDUs, oversized
requests and PDUs, per-address and association limits, AE-title refusals. Every case checks its own end state (what
the peer read, when the socket closed, the audit rows) and that a normal dcmtk C-ECHO and C-STORE still succeed -
during the flood where the flood is held.

The daemon runs with short limits so the suite stays fast: ``association_request_timeout`` 1.5 s, 6 associations,
4 per address (so 32 pending connections in total). Attackers connect from other loopback addresses (127.0.0.2 and
up; all of 127/8 is loopback on Linux) because dcmtk's tools always come from 127.0.0.1.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from daemon.store.tables import AuditEvent
from tests.conftest import DaemonProcess, running_daemon
from tests.dicomgen import make_dataset, write_dataset
from tests.rawpeer import connect, pdu_header, read_until_closed, request_rejection, wait_for

TIMEOUT = 1.5  # association_request_timeout of the daemon under test
MAX_ASSOCIATIONS = 6
PER_ADDRESS = 4
MAX_PENDING = 32  # max(32, 4 x max_associations)
HUGE = 0x7FFFFFFF

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def chexd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("hostile")
    with running_daemon(
        root / "data",
        f"sqlite:///{root / 'chexd.db'}",
        association_request_timeout=str(TIMEOUT),
        max_associations=str(MAX_ASSOCIATIONS),
        max_connections_per_address=str(PER_ADDRESS),
        allowed_calling_aes="ECHOSCU,STORESCU,HOSTILE",
        worker_threads="0",
    ) as daemon:
        yield daemon


def rss_mib(daemon: DaemonProcess) -> float:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_healthy(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A normal dcmtk C-ECHO and C-STORE (a new instance) succeed."""
    echo = subprocess.run(
        ["echoscu", "-to", "5", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    path = write_dataset(make_dataset(seed=1, sop_uid=generate_uid()), tmp_path / f"{time.monotonic_ns()}.dcm")
    store = daemon.storescu("-to", "5", str(path))
    assert store.returncode == 0 and "Success" in store.stderr + store.stdout, store.stderr


def abort(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason])


def audit_rows(daemon: DaemonProcess, event: str, address: str | None = None) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.event == event)
    if address:
        query = query.where(AuditEvent.peer_address == address)
    with daemon.engine().connect() as conn:
        return list(conn.execute(query))


def associate(daemon: DaemonProcess, source: str, aet: str = "HOSTILE", aec: str | None = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return ae.associate("127.0.0.1", daemon.port, ae_title=aec or daemon.ae_title, bind_address=(source, 0))


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# --- floods -------------------------------------------------------------------------------------------------------


def test_half_open_requests_claiming_2_gib_are_aborted_at_the_pdu_header(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    socks = [connect(chexd.port, "127.0.0.2", pdu_header(0x01, HUGE)) for _ in range(30)]
    try:
        assert_healthy(chexd, tmp_path)  # while they are held
        answers = [read_until_closed(s, 2.0) for s in socks]
        assert answers.count(abort(0x06)) >= PER_ADDRESS, answers  # the others were closed before being read
        assert all(a is not None and a in (abort(0x06), b"") for a in answers)
    finally:
        close_all(socks)


def test_requests_with_half_a_body_are_closed_at_the_deadline(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    socks = [connect(chexd.port, "127.0.0.9", pdu_header(0x01, 300) + b"\x00" * 150) for _ in range(PER_ADDRESS)]
    started = time.monotonic()
    try:
        answers = [read_until_closed(s, TIMEOUT + 3) for s in socks]
        elapsed = time.monotonic() - started
        assert answers == [b""] * PER_ADDRESS
        assert TIMEOUT - 0.3 < elapsed < TIMEOUT + 3, f"closed after {elapsed:.1f} s"
    finally:
        close_all(socks)
    assert_healthy(chexd, tmp_path)
    assert wait_for(lambda: any("within 1.5 s" in (r.detail or "") for r in audit_rows(chexd, "connection_dropped")))


def test_silent_connections_never_block_real_peers_and_are_closed(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    socks = [connect(chexd.port, "127.0.0.3") for _ in range(30)]
    try:
        assert_healthy(chexd, tmp_path)
        answers = [read_until_closed(s, TIMEOUT + 2) for s in socks]
        assert answers == [b""] * 30, "every silent connection is closed, none held"
    finally:
        close_all(socks)
    assert wait_for(lambda: audit_rows(chexd, "connection_dropped", "127.0.0.3"))  # written by the edge's thread
    rows = audit_rows(chexd, "connection_dropped", "127.0.0.3")
    assert 1 <= len(rows) <= 3, "one row per cause and address, not one per connection"


def test_a_quick_open_close_burst_leaves_no_slot_taken(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        connect(chexd.port, "127.0.0.4").close()
    started = time.monotonic()
    assert_healthy(chexd, tmp_path)
    assert time.monotonic() - started < 5


def test_pending_connections_are_capped_per_address(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    socks = [connect(chexd.port, "127.0.0.5") for _ in range(PER_ADDRESS + 4)]
    try:
        time.sleep(0.3)
        answers = [read_until_closed(s, 0.01) for s in socks]
        assert answers.count(b"") == 4 and answers.count(None) == PER_ADDRESS
        assert_healthy(chexd, tmp_path)
    finally:
        close_all(socks)
    assert wait_for(
        lambda: any("still negotiating" in (r.detail or "") for r in audit_rows(chexd, "connection_dropped"))
    )


def test_a_full_pending_table_closes_its_oldest_connection(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    oldest = connect(chexd.port, "127.0.1.1")
    time.sleep(0.2)
    others = [connect(chexd.port, f"127.0.2.{i // PER_ADDRESS + 1}") for i in range(MAX_PENDING)]
    try:
        assert read_until_closed(oldest, 1.0) == b""
        assert_healthy(chexd, tmp_path)
    finally:
        close_all([oldest, *others])


# --- oversized input ----------------------------------------------------------------------------------------------


def _stream(sock: socket.socket, first: bytes, total: int) -> int:
    """Send ``first`` then zeros up to ``total`` bytes; return how many the daemon's side took before it closed."""
    sent = 0
    chunk = b"\0" * (1 << 20)
    sock.settimeout(5)
    try:
        sock.sendall(first)
        sent = len(first)
        while sent < total:
            sent += sock.send(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_a_300_mib_request_is_never_buffered(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = rss_mib(chexd)
    sock = connect(chexd.port, "127.0.0.10")
    try:
        sent = _stream(sock, pdu_header(0x01, 300 * 2**20), 300 * 2**20)
    finally:
        sock.close()
    assert sent < 64 * 2**20, f"the daemon side took {sent / 2**20:.0f} MiB"
    assert rss_mib(chexd) - before < 20
    assert_healthy(chexd, tmp_path)


def test_a_request_at_the_limit_followed_by_a_stream_is_read_to_its_length_only(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = rss_mib(chexd)
    sock = connect(chexd.port, "127.0.0.11")
    try:
        sent = _stream(sock, pdu_header(0x01, 65536) + b"\x00\x01" + b"\xff" * 65534, 200 * 2**20)
    finally:
        sock.close()
    assert sent < 64 * 2**20
    assert rss_mib(chexd) - before < 20
    assert_healthy(chexd, tmp_path)


def test_a_pdu_over_max_pdu_size_after_association_ends_it_unread(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = rss_mib(chexd)
    assoc = associate(chexd, "127.0.0.12")
    assert assoc.is_established
    try:
        sent = _stream(assoc.dul.socket.socket, pdu_header(0x04, 100 * 2**20), 100 * 2**20)
    finally:
        assoc.kill()
    assert sent < 64 * 2**20
    assert rss_mib(chexd) - before < 20
    assert_healthy(chexd, tmp_path)
    assert "sent a PDU of 104857600 bytes - the limit is 262144" in chexd.log()


# --- malformed first PDUs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x02, 0x03, 0x04, 0x05, 0x06, 0x07])
def test_a_first_pdu_that_is_not_a_request_gets_an_abort(chexd, tmp_path, pdu_type: int) -> None:  # type: ignore[no-untyped-def]
    sock = connect(chexd.port, "127.0.0.13", pdu_header(pdu_type, 4) + b"\0\0\0\0")
    try:
        assert read_until_closed(sock, 2.0) == abort(0x02), "A-ABORT: unexpected PDU"
    finally:
        sock.close()
    assert_healthy(chexd, tmp_path)


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("http", b"GET / HTTP/1.1\r\nHost: chexd\r\n\r\n", 0x01),
        ("tls_client_hello", bytes.fromhex("16030100f5010000f10303") + os.urandom(64), 0x01),
        ("random", bytes([0xFF]) + random.Random(12).randbytes(500), 0x01),
        ("request_shorter_than_its_fixed_fields", pdu_header(0x01, 10) + b"\0" * 10, 0x06),
        ("request_with_a_garbage_body", pdu_header(0x01, 200) + random.Random(7).randbytes(200), 0x06),
        (
            "request_with_zeroed_items",
            pdu_header(0x01, 200) + b"\x00\x01\x00\x00" + b"CHEXD".ljust(16) + bytes(180),
            0x06,
        ),
    ],
)
def test_garbage_gets_an_abort_and_a_close(chexd, tmp_path, name: str, payload: bytes, reason: int) -> None:  # type: ignore[no-untyped-def]
    sock = connect(chexd.port, "127.0.0.14", payload)
    try:
        assert read_until_closed(sock, 2.0) == abort(reason), name
    finally:
        sock.close()
    assert_healthy(chexd, tmp_path)


# --- refusals as A-ASSOCIATE-RJ ----------------------------------------------------------------------------------


def _echoscu(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-to", "5", *args, "127.0.0.1", str(daemon.port)], capture_output=True, text=True, timeout=30
    )


def test_wrong_called_ae_is_a_permanent_reject(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _echoscu(chexd, "-aec", "NOTCHEXD")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and "Called AE Title Not Recognized" in result.stderr, result.stderr
    assert "Peer aborted" not in result.stderr
    assert request_rejection(chexd.port, "NOTCHEXD", "HOSTILE", "127.0.0.15") == (0x01, 0x01, 0x07)
    assert wait_for(lambda: any(r.called_ae == "NOTCHEXD" for r in audit_rows(chexd, "association_rejected")))
    assert_healthy(chexd, tmp_path)


def test_calling_ae_off_the_allow_list_is_a_permanent_reject(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _echoscu(chexd, "-aet", "INTRUDER", "-aec", chexd.ae_title)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr, result.stderr
    assert request_rejection(chexd.port, chexd.ae_title, "INTRUDER2", "127.0.0.15") == (0x01, 0x01, 0x03)
    assert wait_for(
        lambda: {"INTRUDER", "INTRUDER2"} <= {r.calling_ae for r in audit_rows(chexd, "association_rejected")}
    )
    assert all(r.peer_address for r in audit_rows(chexd, "association_rejected"))
    assert_healthy(chexd, tmp_path)


def test_associations_per_address_are_capped_with_a_transient_reject(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    held = [associate(chexd, "127.0.0.6") for _ in range(PER_ADDRESS)]
    try:
        assert all(a.is_established for a in held)
        assert request_rejection(chexd.port, chexd.ae_title, "HOSTILE", "127.0.0.6") == (0x02, 0x03, 0x02)
        assert_healthy(chexd, tmp_path)  # another address is not affected
    finally:
        for assoc in held:
            assoc.release()
    assert wait_for(
        lambda: any("limit per address is 4" in (r.detail or "") for r in audit_rows(chexd, "association_rejected"))
    )


def test_the_association_limit_is_a_transient_reject_and_frees_at_close(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    held = [associate(chexd, "127.0.0.7") for _ in range(PER_ADDRESS)]
    held += [associate(chexd, "127.0.0.8") for _ in range(MAX_ASSOCIATIONS - PER_ADDRESS)]
    try:
        assert all(a.is_established for a in held)
        result = _echoscu(chexd, "-aec", chexd.ae_title)
        assert result.returncode != 0
        assert "Rejected Transient" in result.stderr and "Local Limit Exceeded" in result.stderr, result.stderr
        # a peer that vanishes without A-RELEASE frees its slot at once
        held[0].dul.socket.socket.close()
        held[0].kill()
        started = time.monotonic()
        assert wait_for(lambda: _echoscu(chexd, "-aec", chexd.ae_title).returncode == 0, timeout=5)
        assert time.monotonic() - started < 5, "pynetdicom alone held such a slot for acse_timeout (30 s)"
    finally:
        for assoc in held[1:]:
            assoc.release()
    assert wait_for(
        lambda: any("association limit 6" in (r.detail or "") for r in audit_rows(chexd, "association_rejected"))
    )
    assert_healthy(chexd, tmp_path)


def test_floods_are_audited_without_flooding_the_audit_table(chexd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for _ in range(50):
        connect(chexd.port, "127.0.0.16", pdu_header(0x01, HUGE)).close()
    assert wait_for(lambda: len(audit_rows(chexd, "connection_dropped", "127.0.0.16")) >= 1)
    time.sleep(0.5)
    rows = audit_rows(chexd, "connection_dropped", "127.0.0.16")
    assert len(rows) == 1 and "limit is 65536" in (rows[0].detail or "")
    assert chexd.log().count("peer=127.0.0.16") == 1, "one log line per window, too"
    assert_healthy(chexd, tmp_path)


def test_no_hostile_input_left_a_traceback_in_the_log(chexd) -> None:  # type: ignore[no-untyped-def]
    log = chexd.log()
    assert "storage SCP listening" in log
    assert "Traceback" not in log
