"""daemon.edge.server: pynetdicom's reactors wait on their inputs (socket data, an outgoing PDU, a decoded DIMSE)
instead of sleeping 1 ms per look, on a real acceptor Association over a socket pair. Waits are set long (5 s) so
each case proves that the event, not the timeout, ended the wait."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

import daemon.edge.server
from daemon.edge.server import ReplaySocket, _wait_instead_of_polling

LONG_WAIT_S = 5.0


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Association, ReplaySocket, socket.socket]]:
    monkeypatch.setattr(daemon.edge.server, "_IDLE_WAIT_S", LONG_WAIT_S)
    ours, peer = socket.socketpair()
    assoc = Association(AE(), MODE_ACCEPTOR)
    sock = ReplaySocket(assoc, client_socket=ours, initial=b"")
    assoc.set_socket(sock)
    _wait_instead_of_polling(assoc, sock)
    yield assoc, sock, peer
    sock.close()
    peer.close()


def _timed(call) -> tuple[object, float]:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def _later(delay_s: float, action) -> threading.Thread:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()), daemon=True)
    thread.start()
    return thread


def test_data_from_the_peer_ends_the_wait_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    _assoc, sock, peer = pair
    _later(0.2, lambda: peer.sendall(b"\x04\x00\x00\x00\x00\x00"))
    ready, seconds = _timed(lambda: sock.ready)
    assert ready is True and seconds < LONG_WAIT_S / 2


def test_a_queued_outgoing_pdu_ends_the_wait_without_data(pair, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    assoc, sock, _peer = pair
    _later(0.2, lambda: assoc.dul.to_provider_queue.put("primitive"))
    ready, seconds = _timed(lambda: sock.ready)
    assert ready is False and seconds < LONG_WAIT_S / 2
    assert assoc.dul.to_provider_queue.get_nowait() == "primitive"
    monkeypatch.setattr(daemon.edge.server, "_IDLE_WAIT_S", 0.3)
    ready, seconds = _timed(lambda: sock.ready)  # the wake-up was consumed: the next look waits its full time again
    assert ready is False and seconds >= 0.25


def test_a_decoded_dimse_message_ends_the_association_threads_wait(pair) -> None:  # type: ignore[no-untyped-def]
    assoc, _sock, _peer = pair
    _later(0.2, lambda: assoc.dimse.msg_queue.put((1, "message")))
    item, seconds = _timed(lambda: assoc.dimse.get_msg(block=False))
    assert item == (1, "message") and seconds < LONG_WAIT_S / 2


def test_nothing_to_do_returns_after_the_wait(pair, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    assoc, sock, _peer = pair
    monkeypatch.setattr(daemon.edge.server, "_IDLE_WAIT_S", 0.05)
    assert sock.ready is False
    assert assoc.dimse.get_msg(block=False) == (None, None)


def test_close_releases_the_wake_pipe(pair, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _assoc, sock, _peer = pair
    monkeypatch.setattr(daemon.edge.server, "_IDLE_WAIT_S", 0.01)
    fd = sock._wake_r
    os.fstat(fd)
    sock.close()
    assert not sock._close_wake.alive  # both ends closed once, by close() (else by the finalizer)
    sock.wake()  # after close: harmless
    assert sock.ready is False


def test_only_the_edge_association_threads_1ms_pause_is_skipped(pair) -> None:  # type: ignore[no-untyped-def]
    import pynetdicom.association

    assoc, _sock, _peer = pair
    assert isinstance(pynetdicom.association.time, daemon.edge.server._ReactorTime)
    assert assoc._chexd_waits_on_queue is True
    reactor_time = pynetdicom.association.time
    results: dict[str, float] = {}

    def pauses(name: str) -> None:
        start = time.monotonic()
        for _ in range(50):
            reactor_time.sleep(0.001)
        results[name] = time.monotonic() - start
        start = time.monotonic()
        reactor_time.sleep(0.02)  # any other duration sleeps everywhere
        results[name + " 20 ms"] = time.monotonic() - start

    edge_thread = threading.Thread(target=pauses, args=("edge",))
    edge_thread._chexd_waits_on_queue = True  # type: ignore[attr-defined]  # as on an edge Association
    edge_thread.start()
    edge_thread.join(10)
    pauses("other")
    assert results["edge"] < 0.025 and results["other"] >= 0.05
    assert results["edge 20 ms"] >= 0.019 and results["other 20 ms"] >= 0.019
    assert reactor_time.monotonic() > 0  # everything else is the time module's
