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
