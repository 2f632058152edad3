"""The edge's guard logic (daemon.edge.server): the request reader, the audit limiter, and an in-process EdgeServer
with a Verification-only AE exercised by raw sockets and pynetdicom's requestor."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from daemon.edge.server import (
    AbortReason,
    AuditLimiter,
    EdgeConfig,
    EdgeEvent,
    EdgeLimits,
    EdgeServer,
    Refusal,
    RejectReason,
    RejectResult,
    RejectSource,
    RequestError,
    RequestReader,
    abort_pdu,
    decode_request,
    local_limit,
    start_edge_server,
)
from tests.rawpeer import connect, pdu_header, read_until_closed, request_rejection, wait_for

HUGE = 0x7FFFFFFF


# --- RequestReader -------------------------------------------------------------------------------------------------


def test_reader_asks_for_the_header_then_exactly_the_claimed_body() -> None:
    reader = RequestReader(max_request_bytes=1024)
    assert reader.wanted() == 6
    reader.feed(pdu_header(0x01, 100)[:4])
    assert reader.wanted() == 2
    reader.feed(pdu_header(0x01, 100)[4:])
    assert reader.wanted() == 100 and not reader.complete
    reader.feed(b"x" * 100)
    assert reader.complete and reader.wanted() == 0 and len(reader.data) == 106
    with pytest.raises(ValueError, match="only 0 wanted"):
        reader.feed(b"y")


@pytest.mark.parametrize(
    ("header", "abort", "message"),
    [
        (pdu_header(0x04, 100), AbortReason.UNEXPECTED_PDU, "type 0x04"),
        (pdu_header(0x47, 100), AbortReason.UNRECOGNIZED_PDU, "type 0x47"),
        (
            pdu_header(0x01, HUGE),
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
            "claims 2147483647 bytes - the limit is 1024",
        ),
        (pdu_header(0x01, 1025), AbortReason.INVALID_PDU_PARAMETER_VALUE, "the limit is 1024"),
        (pdu_header(0x01, 10), AbortReason.INVALID_PDU_PARAMETER_VALUE, "shorter than its fixed fields"),
    ],
)
def test_reader_refuses_a_bad_first_pdu_from_itspdu_header(header: bytes, abort: AbortReason, message: str) -> None:
    reader = RequestReader(max_request_bytes=1024)
    with pytest.raises(RequestError, match=message) as info:
        reader.feed(header)
    assert info.value.abort is abort


def test_reject_and_abort_pdus_follow_ps3_8() -> None:
    refusal = local_limit("busy")
    rj = A_ASSOCIATE_RJ()
    rj.decode(refusal.pdu())
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x02, 0x03, 0x02)
    assert abort_pdu(AbortReason.UNEXPECTED_PDU) == bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 2])


# --- AuditLimiter --------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _event(address: str = "10.0.0.1", kind: str = "deadline") -> EdgeEvent:
    return EdgeEvent(event="connection_dropped", kind=kind, peer_address=address, detail=f"{kind} from {address}")


def test_audit_limiter_writes_the_first_and_folds_the_rest_into_one_count() -> None:
    clock = _Clock()
    limiter = AuditLimiter(interval=60, clock=clock)
    assert limiter.note(_event()) is not None
    assert [limiter.note(_event()) for _ in range(500)] == [None] * 500
    assert limiter.note(_event(kind="tls")) is not None, "another cause is its own row"
    assert limiter.note(_event(address="10.0.0.2")) is not None, "another address is its own row"
    assert limiter.due() == []
    clock.now += 61
    (summary,) = limiter.due()
    assert summary.count == 500 and summary.peer_address == "10.0.0.1" and "500 more in 60 s" in summary.detail
    assert limiter.due() == []
    assert limiter.note(_event()) is not None, "a new window starts with a row"


def test_audit_limiter_folds_addresses_beyond_its_key_budget() -> None:
    limiter = AuditLimiter(interval=60, clock=_Clock(), max_keys=3)
    written = [limiter.note(_event(address=f"10.0.1.{i}")) for i in range(100)]
    assert sum(e is not None for e in written) == 4  # three addresses and one "*" row
    assert {e.peer_address for e in written if e is not None} == {"10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3"}


def test_edge_limits_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="Invalid max_request_bytes 10"):
        EdgeLimits(request_timeout=1, max_request_bytes=10, max_associations=1, max_per_address=1, max_pending=1)


# --- an in-process server ------------------------------------------------------------------------------------------

LIMITS = EdgeLimits(
    request_timeout=0.6,
    max_request_bytes=65536,
    max_associations=3,
    max_per_address=2,
    max_pending=6,
    max_pdu_bytes=65536,
    audit_interval=60,
)


def _start(admit, events: list[EdgeEvent] | None = None) -> EdgeServer:  # type: ignore[no-untyped-def]
    """A Verification-only AE titled EDGE behind the edge on a free loopback port."""
    ae = AE(ae_title="EDGE")
    ae.add_supported_context(Verification)
    ae.maximum_associations = LIMITS.max_associations
    return start_edge_server(
        ae,
        EdgeConfig(
            address=("127.0.0.1", 0),
            limits=LIMITS,
            admit=admit,
            audit=events.append if events is not None else None,
            evt_handlers=[(evt.EVT_C_ECHO, lambda _event: 0x0000)],
        ),
    )


@pytest.fixture
def edge() -> Iterator[tuple[EdgeServer, list[EdgeEvent]]]:
    events: list[EdgeEvent] = []

    def admit(calling: str, called: str, address: str) -> Refusal | None:
        if called != "EDGE":
            return Refusal(
                result=RejectResult.REJECTED_PERMANENT,
                source=RejectSource.SERVICE_USER,
                reason=RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED,
                detail=f"called AE {called!r}",
            )
        return None

    server = _start(admit, events)
    yield server, events
    server.shutdown()


def _associate(port: int, source: str = "127.0.0.1", aec: str = "EDGE"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="UNIT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=aec, bind_address=(source, 0))


def _echo_ok(port: int, source: str = "127.0.0.1") -> bool:
    assoc = _associate(port, source)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def test_huge_claimed_request_gets_an_abort_at_once(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    sock = connect(server.server_address[1], "127.0.0.2", pdu_header(0x01, HUGE))
    assert read_until_closed(sock, 2.0) == abort_pdu(AbortReason.INVALID_PDU_PARAMETER_VALUE)
    assert wait_for(lambda: any(e.kind == "bad_request" for e in events))


def test_silent_connections_do_not_take_association_slots_and_meet_the_deadline(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    port = server.server_address[1]
    silent = [connect(port, f"127.0.0.{10 + i}") for i in range(LIMITS.max_pending)]
    assert wait_for(lambda: server.pending_count() == LIMITS.max_pending)
    assert _echo_ok(port), "pending connections must not count against max_associations"
    started = time.monotonic()
    for sock in silent:
        assert read_until_closed(sock, 3.0) == b""
    assert time.monotonic() - started < LIMITS.request_timeout + 2.0
    assert wait_for(lambda: server.pending_count() == 0)
    assert wait_for(lambda: any(e.kind == "deadline" and "within 0.6 s" in e.detail for e in events))


def test_pending_connections_are_capped_per_address(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    port = server.server_address[1]
    socks = [connect(port, "127.0.0.3") for _ in range(LIMITS.max_per_address + 2)]
    # the ones over the cap are closed at once, the others wait for the deadline
    time.sleep(0.2)
    results = [read_until_closed(s, 0.01) for s in socks]
    assert results.count(b"") == 2 and results.count(None) == LIMITS.max_per_address
    assert wait_for(lambda: any(e.kind == "address_pending" for e in events))


def test_the_oldest_pending_connection_is_closed_when_the_table_is_full(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    port = server.server_address[1]
    oldest = connect(port, "127.0.0.20")
    assert wait_for(lambda: server.pending_count() == 1)
    newer = [connect(port, f"127.0.0.{21 + i}") for i in range(LIMITS.max_pending)]
    assert read_until_closed(oldest, 1.0) == b""
    assert wait_for(lambda: server.pending_count() == LIMITS.max_pending)
    assert wait_for(lambda: any(e.kind == "evicted" for e in events))
    for sock in newer:
        sock.close()


def test_association_limits_answer_a_transient_reject_and_free_at_close(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    port = server.server_address[1]
    held = [_associate(port, "127.0.0.4") for _ in range(LIMITS.max_per_address)]
    assert all(a.is_established for a in held)
    assert request_rejection(port, "EDGE", source="127.0.0.4") == (0x02, 0x03, 0x02), "transient, local limit exceeded"
    held.append(_associate(port, "127.0.0.5"))
    assert held[-1].is_established
    assert request_rejection(port, "EDGE", source="127.0.0.6")[2] == 0x02
    assert wait_for(lambda: any("association limit 3 reached" in e.detail for e in events))
    # an abrupt close (no A-RELEASE) frees its slot at once, not after acse_timeout
    held[0].dul.socket.socket.close()
    held[0].kill()
    assert wait_for(lambda: server.association_counts("127.0.0.4")[0] == 2, timeout=2.0)
    assert _echo_ok(port, "127.0.0.6")
    for assoc in held[1:]:
        assoc.release()


def test_wrong_called_ae_is_a_permanent_reject_the_peer_reads(edge) -> None:  # type: ignore[no-untyped-def]
    server, events = edge
    assert request_rejection(server.server_address[1], "OTHER") == (0x01, 0x01, 0x07)
    assert wait_for(lambda: any(e.event == "association_rejected" and e.called_ae == "OTHER" for e in events))


def test_a_pdu_over_the_limit_after_association_closes_it_unread(edge) -> None:  # type: ignore[no-untyped-def]
    server, _ = edge
    port = server.server_address[1]
    assoc = _associate(port, "127.0.0.7")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    sock.sendall(pdu_header(0x04, 50 * 2**20) + b"\0" * 65536)
    assert wait_for(lambda: server.association_counts("127.0.0.7")[1] == 0, timeout=3.0)
    assoc.kill()
    assert _echo_ok(port)


@pytest.mark.parametrize(
    ("called", "calling", "message"),
    [
        (b"\xff" * 16, b"SCU".ljust(16), "called AE title is not an AE title: ff ff"),
        (b"CHEXD".ljust(16), b"\x00" * 16, "calling AE title is not an AE title: 00 00"),
        (b" " * 16, b"SCU".ljust(16), "called AE title is not an AE title: '  "),
        (b"CHEXD".ljust(16), b"A\\B".ljust(16), "calling AE title is not an AE title: 'A\\\\B"),
    ],
)
def test_request_ae_fields_are_checked_before_pynetdicom_decodes_them(
    called: bytes, calling: bytes, message: str
) -> None:
    body = b"\x00\x01\x00\x00" + called + calling + bytes(32) + bytes(40)
    with pytest.raises(RequestError, match=message.replace("\\", "\\\\")):
        decode_request(pdu_header(0x01, len(body)) + body)


# --- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("max_connections_per_address", 0, "must be >= 1"),
        ("association_request_timeout", 0.0, r"must be in \(0, 600\] seconds"),
        ("association_request_timeout", float("nan"), r"must be in \(0, 600\] seconds"),
        ("max_association_request_bytes", 100, "must be in 1024..16777216 bytes"),
    ],
)
def test_edge_settings_name_the_value_and_rule(name: str, value: object, rule: str) -> None:
    from daemon.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=f"Invalid {name} .* - {rule}"):
        Settings(**{name: value})  # type: ignore[arg-type]


def test_edge_limits_follow_the_settings() -> None:
    from daemon.edge.scp import edge_limits
    from daemon.settings import Settings

    limits = edge_limits(Settings())
    assert (limits.request_timeout, limits.max_request_bytes) == (10.0, 65536)
    assert (limits.max_associations, limits.max_per_address, limits.max_pending) == (25, 10, 100)
    small = edge_limits(Settings(max_associations=2, max_connections_per_address=10))
    assert (small.max_per_address, small.max_pending) == (2, 32), "one address never gets more than the total"


def test_a_failing_admission_check_refuses_and_the_edge_keeps_serving() -> None:
    calls: list[str] = []

    def admit(calling: str, called: str, address: str) -> Refusal | None:
        calls.append(calling)
        if calling == "BOOM":
            raise RuntimeError("bug")
        return None

    server = _start(admit)
    try:
        port = server.server_address[1]
        assert request_rejection(port, "EDGE", calling="BOOM") == (0x02, 0x01, 0x01)
        assert _echo_ok(port)
        assert calls == ["BOOM", "UNIT"]
    finally:
        server.shutdown()
