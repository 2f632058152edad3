"""A raw TCP peer for network-edge tests: connect from a chosen loopback address, send bytes, read what the server
answers until it closes. All of 127/8 is loopback on Linux, so tests can play several peers."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header: type, reserved, big-endian length (PS3.8 9.3.1)."""
    return struct.pack(">BBL", pdu_type, 0, length)


def connect(port: int, source: str = "127.0.0.1", payload: bytes = b"") -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` that has sent ``payload``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    if payload:
        sock.sendall(payload)
    return sock


def read_until_closed(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before it closed the connection; None when it is still open after ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def wait_for(predicate: Callable[[], object], timeout: float = 3.0) -> bool:
    """Poll ``predicate`` every 50 ms until it is true or ``timeout`` seconds pass; its last truth value."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(predicate())


def association_request(called: str, calling: str = "UNIT") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification, encoded by pynetdicom's own PDU classes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def request_rejection(port: int, called: str, calling: str = "UNIT", source: str = "127.0.0.1") -> tuple[int, ...]:
    """Send an A-ASSOCIATE-RQ from a raw socket and return the (result, source, diagnostic) of the A-ASSOCIATE-RJ the
    server answers. A raw peer, because pynetdicom 3.0's requestor turns a reject that arrives before its own thread
    checks the connection into an abort (acse._negotiate_as_requestor), so its is_rejected is racy under load.
    Raises AssertionError when the answer is anything but an A-ASSOCIATE-RJ followed by a close."""
    sock = connect(port, source, association_request(called, calling))
    try:
        answer = read_until_closed(sock, 5.0)
    finally:
        sock.close()
    assert answer is not None, "the server kept the connection open after its answer"
    assert len(answer) == 10 and answer[:6] == pdu_header(0x03, 4), f"not an A-ASSOCIATE-RJ: {answer[:16].hex()}"
    return tuple(answer[7:10])
