"""The DICOM network edge: a guard in front of pynetdicom's association server.

pynetdicom (3.0.4) gives every accepted TCP connection an association thread at once, and that thread counts against
``max_associations`` until it ends: a peer that sends 6 bytes of an A-ASSOCIATE-RQ claiming 2 GiB, or nothing at all,
or connects and closes, holds a slot for ``acse_timeout`` or for ever, and the bytes of a claimed PDU are buffered
before anything is checked. This module puts a small selector loop between ``accept()`` and pynetdicom:

- a connection first waits in a *pending* table (bounded in total and per source address; when full, the oldest
  pending connection is closed) that does not count against ``max_associations``;
- the TLS handshake (when a context is given) and a complete A-ASSOCIATE-RQ must arrive within
  ``request_timeout`` seconds of ``accept()``;
- the first PDU must be an A-ASSOCIATE-RQ (type 0x01, PS3.8 9.3.2) no longer than ``max_request_bytes``; otherwise
  the connection gets an A-ABORT and is closed, and nothing beyond the request's own length is ever read;
- the decoded request is checked by the caller's ``admit`` (AE titles) and against the association limits
  (``max_associations`` in total, ``max_per_address`` per source address); a refusal is an A-ASSOCIATE-RJ written
  by this module (PS3.8 9.3.4) followed by a close, so the peer always reads the reason;
- an admitted connection is handed to pynetdicom with the request bytes replayed first (:class:`ReplaySocket`),
  so the association thread starts with a complete request and frees its slot when the peer goes.

Refusals and dropped connections are audited through a rate limiter (one row per kind and address per
``audit_interval`` seconds, with a count of the ones folded into it), so a flood cannot flood the audit table.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import select
import selectors
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from daemon.edge.tls import describe_tls_error, peer_closed_silently
from daemon.errors import DaemonError

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

PDU_HEADER_BYTES = 6  # type (1), reserved (1), length (4, big endian) - PS3.8 9.3.1
MIN_REQUEST_BODY_BYTES = 68  # protocol version .. reserved fields of an A-ASSOCIATE-RQ before its items (9.3.2)
_A_ASSOCIATE_RQ = 0x01
_KNOWN_PDU_TYPES = range(0x01, 0x08)
_RECV_CHUNK = 1 << 20  # bytes asked of the kernel per recv_into once a PDU length is known
# pynetdicom 3.0.4's reactors poll: the DUL sleeps 1 ms whenever it found nothing to do and the association thread
# sleeps 1 ms before each look at its DIMSE queue, so every C-STORE waited ~1.5 ms in sleeps (receive the request,
# hand it to the handler, send the answer). Instead they wait on what they poll, at most this long (seconds): data or
# an outgoing PDU wakes the DUL at once, a decoded message the association thread. Kill/timer checks run as often.
_IDLE_WAIT_S = 0.002


class RejectResult(enum.IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class RejectSource(enum.IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(enum.IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. (PS3.8 9.3.4); the meaning depends on the source, the value does not."""

    NO_REASON_GIVEN = 0x01
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03  # source SERVICE_USER
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07  # source SERVICE_USER
    LOCAL_LIMIT_EXCEEDED = 0x02  # source SERVICE_PROVIDER_PRESENTATION


class AbortReason(enum.IntEnum):
    """A-ABORT Reason/Diag. with source 0x02, the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    INVALID_PDU_PARAMETER_VALUE = 0x06


@dataclass(frozen=True, kw_only=True, slots=True)
class Refusal:
    """Why an association request is refused, as the A-ASSOCIATE-RJ fields plus a sentence for logs and audit."""

    result: RejectResult
    source: RejectSource
    reason: RejectReason
    detail: str

    def pdu(self) -> bytes:
        """The A-ASSOCIATE-RJ PDU (10 bytes)."""
        return struct.pack(">BBLBBBB", 0x03, 0x00, 4, 0x00, self.result, self.source, self.reason)


def abort_pdu(reason: AbortReason) -> bytes:
    """An A-ABORT PDU from the service provider (source 0x02) with ``reason`` (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x02, reason)


def local_limit(detail: str) -> Refusal:
    """Transient, service provider (presentation), local limit exceeded - the peer may retry later."""
    return Refusal(
        result=RejectResult.REJECTED_TRANSIENT,
        source=RejectSource.SERVICE_PROVIDER_PRESENTATION,
        reason=RejectReason.LOCAL_LIMIT_EXCEEDED,
        detail=detail,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeLimits:
    """The guards' limits. Durations in seconds, sizes in bytes, counts of TCP connections."""

    request_timeout: float  # from accept() to a complete A-ASSOCIATE-RQ, TLS handshake included
    max_request_bytes: int  # largest A-ASSOCIATE-RQ PDU length field accepted
    max_associations: int  # associations handed to pynetdicom, in total
    max_per_address: int  # associations, and separately connections still pending, per source address
    max_pending: int  # connections still waiting for their request, in total (oldest closed beyond it)
    max_pdu_bytes: int = 0  # largest PDU length accepted once associated; 0: no limit
    audit_interval: float = 60.0  # one audit row per kind and address per this many seconds

    def __post_init__(self) -> None:
        if not self.request_timeout > 0:
            raise ValueError(f"Invalid request_timeout {self.request_timeout} - must be > 0 seconds")
        if self.max_request_bytes < MIN_REQUEST_BODY_BYTES:
            raise ValueError(f"Invalid max_request_bytes {self.max_request_bytes} - must be >= 68")
        for name in ("max_associations", "max_per_address", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name} {getattr(self, name)} - must be >= 1")
        if self.max_pdu_bytes < 0 or self.audit_interval <= 0:
            raise ValueError("max_pdu_bytes must be >= 0 and audit_interval > 0")


class RequestError(DaemonError):
    """The bytes a peer sent cannot be the start of an acceptable A-ASSOCIATE-RQ; ``abort`` is what to answer."""

    def __init__(self, message: str, abort: AbortReason | None) -> None:
        super().__init__(message)
        self.abort = abort


class RequestReader:
    """Incremental reader of the first PDU of a connection; never holds more than ``6 + max_request_bytes``.

    ``wanted()`` says how many bytes to read next (exactly what the PDU still lacks, so bytes after the request stay
    in the kernel); ``feed()`` takes them and raises :class:`RequestError` as soon as the header shows a PDU that is
    not an A-ASSOCIATE-RQ or is longer than the limit; ``complete`` is true once the whole PDU is in ``data``.
    """

    def __init__(self, max_request_bytes: int) -> None:
        self.max_request_bytes = max_request_bytes
        self._buffer = bytearray()
        self._length: int | None = None

    def wanted(self) -> int:
        if self._length is None:
            return PDU_HEADER_BYTES - len(self._buffer)
        return PDU_HEADER_BYTES + self._length - len(self._buffer)

    @property
    def complete(self) -> bool:
        return self._length is not None and self.wanted() == 0

    @property
    def data(self) -> bytes:
        return bytes(self._buffer)

    def feed(self, chunk: bytes) -> None:
        if len(chunk) > self.wanted():
            raise ValueError(f"fed {len(chunk)} bytes, only {self.wanted()} wanted")
        self._buffer += chunk
        if self._length is not None or len(self._buffer) < PDU_HEADER_BYTES:
            return
        pdu_type, _, length = struct.unpack(">BBL", self._buffer[:PDU_HEADER_BYTES])
        if pdu_type != _A_ASSOCIATE_RQ:
            known = pdu_type in _KNOWN_PDU_TYPES
            raise RequestError(
                f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ (0x01)",
                AbortReason.UNEXPECTED_PDU if known else AbortReason.UNRECOGNIZED_PDU,
            )
        if length > self.max_request_bytes:
            raise RequestError(
                f"A-ASSOCIATE-RQ claims {length} bytes - the limit is {self.max_request_bytes}",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        if length < MIN_REQUEST_BODY_BYTES:
            raise RequestError(
                f"A-ASSOCIATE-RQ claims {length} bytes - shorter than its fixed fields ({MIN_REQUEST_BODY_BYTES})",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        self._length = length


def _check_ae_field(name: str, raw: bytes) -> None:
    """An AE title field (PS3.8 9.3.2, VR AE in PS3.5 6.2): 16 bytes of the default repertoire without control
    characters or backslash, not all spaces. Checked here so pynetdicom never logs a decoding traceback for it."""
    if not raw.strip(b" ") or any(byte < 0x20 or byte > 0x7E or byte == 0x5C for byte in raw):
        shown = raw.hex(" ") if any(byte < 0x20 or byte > 0x7E for byte in raw) else repr(raw.decode("ascii"))
        raise RequestError(
            f"A-ASSOCIATE-RQ {name} is not an AE title: {shown}", AbortReason.INVALID_PDU_PARAMETER_VALUE
        )


def decode_request(data: bytes) -> A_ASSOCIATE_RQ:
    """Decode a complete A-ASSOCIATE-RQ PDU; raises :class:`RequestError` when pynetdicom cannot."""
    _check_ae_field("called AE title", data[10:26])
    _check_ae_field("calling AE title", data[26:42])
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(data)
        _ = (pdu.calling_ae_title, pdu.called_ae_title)
    except Exception as exc:
        reason = AbortReason.INVALID_PDU_PARAMETER_VALUE
        raise RequestError(f"A-ASSOCIATE-RQ cannot be decoded: {exc}", reason) from None
    return pdu


# --- audit rate limiting ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    start: float
    detail: str
    folded: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeEvent:
    """One audit row the edge wants written: ``count`` occurrences of ``kind`` from ``peer_address``."""

    event: str  # audit event name: association_rejected or connection_dropped
    kind: str  # short key of the cause, e.g. "deadline", "called_ae", "limit"
    peer_address: str
    detail: str
    count: int = 1
    calling_ae: str | None = None
    called_ae: str | None = None


class AuditLimiter:
    """At most one audit row per (event, kind, address) per ``interval`` seconds.

    The first occurrence in a window is written at once; later ones in the window are folded into a count that
    :meth:`due` returns once the window has passed. Beyond ``max_keys`` distinct keys, addresses are folded to
    ``"*"`` so a peer with many addresses cannot grow the table either.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096) -> None:
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[tuple[str, str, str], _Window] = {}

    def note(self, event: EdgeEvent) -> EdgeEvent | None:
        """The event to write now, or None when it is folded into the open window's count."""
        key = (event.event, event.kind, event.peer_address)
        if key not in self._windows and len(self._windows) >= self.max_keys:
            key = (event.event, event.kind, "*")
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.start < self.interval:
            window.folded += 1
            return None
        self._windows[key] = _Window(start=now, detail=event.detail)
        return event

    def due(self) -> list[EdgeEvent]:
        """Summary rows for windows that have passed with folded occurrences; forgets every passed window."""
        now = self.clock()
        out = []
        for key, window in list(self._windows.items()):
            if now - window.start < self.interval:
                continue
            del self._windows[key]
            if window.folded:
                event, kind, address = key
                out.append(
                    EdgeEvent(
                        event=event,
                        kind=kind,
                        peer_address=address,
                        count=window.folded,
                        detail=f"{window.folded} more in {self.interval:.0f} s like: {window.detail}",
                    )
                )
        return out


class _AuditWriter(threading.Thread):
    """Writes edge events off the selector thread (a database commit must not stall the edge); bounded queue."""

    def __init__(self, sink: Callable[[EdgeEvent], None]) -> None:
        super().__init__(name="chexd-edge-audit", daemon=True)
        self.sink = sink
        self.queue: queue.Queue[EdgeEvent | None] = queue.Queue(maxsize=1024)
        self.dropped = 0

    def put(self, event: EdgeEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        while (event := self.queue.get()) is not None:
            try:
                self.sink(event)
            except Exception:
                log.exception("edge audit sink failed for %s", event.kind)

    def stop(self) -> None:
        self.queue.put(None)
        self.join(timeout=5)


# --- pynetdicom integration ------------------------------------------------------------------------------------------


class ReplaySocket(AssociationSocket):
    """An :class:`AssociationSocket` that first yields bytes the edge already read (the A-ASSOCIATE-RQ), reads the
    rest of each PDU with large ``recv_into`` calls instead of 4 KiB ``recv``s, and refuses a PDU longer than
    ``max_pdu_bytes`` (returns short, which pynetdicom treats as a closed connection) instead of buffering it."""

    def __init__(
        self, assoc: Association, client_socket: socket.socket, initial: bytes, max_pdu_bytes: int = 0
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._initial = bytearray(initial)
        self.max_pdu_bytes = max_pdu_bytes
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # written when a PDU is queued to send
        self._close_wake = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    def wake(self) -> None:
        """Interrupt a waiting :attr:`ready` (the DUL has a primitive to send)."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # pipe full (a wake-up is pending anyway) or closed
            pass

    @property
    def ready(self) -> bool:
        """True when a PDU can be read. Waits up to ``_IDLE_WAIT_S`` for data or a :meth:`wake` (instead of the DUL's
        1 ms sleep), so the DUL reacts to a PDU or an outgoing primitive at once."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(_IDLE_WAIT_S)  # closed: the DUL's own sleep is near zero, so it must not spin here
            return False
        if self._initial:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if not self.assoc.dul.to_provider_queue.empty():
            return bool(super().ready)
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], _IDLE_WAIT_S)
        except (OSError, ValueError):
            return bool(super().ready)  # the socket went away: pynetdicom's check reports it (Evt17)
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        return sock in readable

    def close(self) -> None:
        super().close()
        self._close_wake()

    def recv(self, nr_bytes: int) -> bytearray:
        if self.max_pdu_bytes and nr_bytes > self.max_pdu_bytes + PDU_HEADER_BYTES:
            log.warning(
                "association aborted: peer %s sent a PDU of %d bytes - the limit is %d",
                self.assoc.requestor.address,
                nr_bytes,
                self.max_pdu_bytes,
            )
            self._shutdown_socket()
            return bytearray()
        out = bytearray(nr_bytes)
        got = min(len(self._initial), nr_bytes)
        if got:
            out[:got] = self._initial[:got]
            del self._initial[:got]
        sock = self.socket
        if got < nr_bytes and sock is not None:
            with memoryview(out) as view:
                while got < nr_bytes:
                    n = sock.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
                    if not n:
                        break
                    got += n
        if got < nr_bytes:
            del out[got:]
        return out


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's to-provider queue: a put also wakes the socket's :attr:`ReplaySocket.ready` wait."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _ReactorTime:
    """Stands in for the ``time`` module inside ``pynetdicom.association``: its only 1 ms sleep is the association
    reactor's pause before each look at the DIMSE queue (pynetdicom 3.0.4, ``Association._run_reactor``). On an
    association of this edge that look already waits on the queue (:func:`_wait_instead_of_polling`), so the pause is
    skipped there; every other caller and every other duration sleeps as before."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0.001 and getattr(threading.current_thread(), "_chexd_waits_on_queue", False):
            return
        time.sleep(seconds)


def _install_reactor_time() -> None:
    import pynetdicom.association

    if not isinstance(pynetdicom.association.time, _ReactorTime):
        pynetdicom.association.time = _ReactorTime()  # type: ignore[assignment]


def _wait_instead_of_polling(assoc: Association, sock: ReplaySocket) -> None:
    """Make ``assoc``'s reactors wait on their inputs instead of sleeping 1 ms per look (see ``_IDLE_WAIT_S``):
    the DUL waits in :attr:`ReplaySocket.ready` (no sleep of its own), the association thread's non-blocking look at
    its DIMSE queue waits up to ``_IDLE_WAIT_S`` for a message and skips its 1 ms pause (:class:`_ReactorTime`), so
    it never spins. Behaviour is otherwise pynetdicom's."""
    _install_reactor_time()
    assoc._chexd_waits_on_queue = True  # type: ignore[attr-defined]  # the Association is its reactor's thread
    dul = assoc.dul
    dul.to_provider_queue = _WakingQueue(sock.wake)
    dul._run_loop_delay = 5e-5  # the wait happens in ready (pynetdicom also sleeps this long while stopping the DUL)
    dimse = assoc.dimse
    msg_queue = dimse.msg_queue

    def get_msg(block: bool = False) -> Any:
        try:
            return msg_queue.get(block=True, timeout=dimse.dimse_timeout if block else _IDLE_WAIT_S)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class _Handoff:
    """What the edge passes to the request handler: the socket and the request bytes already read from it."""

    sock: socket.socket
    initial: bytes


class EdgeRequestHandler(RequestHandler):
    """pynetdicom's RequestHandler with a :class:`ReplaySocket` (same association set-up as pynetdicom 3.0.4)."""

    request: _Handoff  # type: ignore[assignment]
    server: EdgeServer

    def _create_association(self) -> Association:
        from pynetdicom.association import Association

        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = ReplaySocket(
            assoc,
            client_socket=self.request.sock,
            initial=self.request.initial,
            max_pdu_bytes=self.server.limits.max_pdu_bytes,
        )
        assoc.set_socket(sock)
        _wait_instead_of_polling(assoc, sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])  # type: ignore[index]
        return assoc


@dataclass(slots=True, eq=False)
class _Pending:
    sock: socket.socket
    address: str
    client_address: tuple[Any, ...]
    deadline: float
    reader: RequestReader
    handshaken: bool
    events: int = selectors.EVENT_READ


Admit = Callable[[str, str, str], Refusal | None]  # (calling AE, called AE, peer address) -> refusal or None


class EdgeServer(ThreadedAssociationServer):
    """A pynetdicom association server whose accepted connections pass the edge guards first (module docstring).

    ``admit(calling_ae, called_ae, address)`` returns a :class:`Refusal` or None; ``audit(event)`` receives the
    rate-limited :class:`EdgeEvent` rows (on a background thread). Construct through :func:`start_edge_server`.
    """

    request_queue_size = 128  # listen backlog: a burst of connects must not make real peers wait for SYN retries

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: EdgeLimits,
        admit: Admit | None = None,
        audit: Callable[[EdgeEvent], None] | None = None,
    ) -> None:
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers, request_handler=EdgeRequestHandler
        )
        self.limits = limits
        self.admit = admit
        self._limiter = AuditLimiter(limits.audit_interval)
        self._writer = _AuditWriter(audit or (lambda _event: None))
        self._inbox: queue.SimpleQueue[tuple[socket.socket, tuple[Any, ...]]] = queue.SimpleQueue()
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()  # oldest first
        self._pending_by_address: dict[str, int] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._gate = threading.Thread(target=self._gate_loop, name="chexd-edge", daemon=True)
        self._writer.start()
        self._gate.start()

    # --- accept side (pynetdicom's serve_forever thread) ---------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:  # type: ignore[override]
        """Accept without TLS: the handshake runs in the edge loop, under the request deadline."""
        listener = cast(socket.socket, self.socket)
        return listener.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._inbox.put((request, tuple(client_address)))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the wake pipe is full: the loop is awake already

    def server_close(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        super().server_close()
        self._gate.join(timeout=5)
        self._writer.stop()

    def service_actions(self) -> None:
        """Nothing. pynetdicom's runs a full ``gc.collect()`` every 60 accepted connections; with torch loaded that
        holds the GIL ~350 ms (2-core VM), so a connect flood stalled every association. Python's own collector
        still runs."""

    # --- counts --------------------------------------------------------------------------------------------------

    def association_counts(self, address: str) -> tuple[int, int]:
        """(associations in pynetdicom in total, of them from ``address``). One that is released, aborted or rejected
        no longer counts, though its thread may still be winding down (its DUL stops within milliseconds): a modality
        that releases and associates again at once must not meet its own finished association."""
        active = [a for a in self.active_associations if not (a.is_released or a.is_aborted or a.is_rejected)]
        return len(active), sum(1 for a in active if a.requestor.address == address)

    def pending_count(self) -> int:
        return len(self._pending)

    # --- the edge loop -------------------------------------------------------------------------------------------

    def _gate_loop(self) -> None:
        """The edge's one thread: until server_close(), run ticks; an unexpected error is logged and the loop goes
        on (a dead loop would stop every association)."""
        next_flush = time.monotonic() + 1.0
        while not self._stop.is_set():
            try:
                self._tick()
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + 1.0
                    for event in self._limiter.due():
                        self._emit(event)
            except Exception:
                log.exception("network edge loop error (continuing)")
                time.sleep(0.1)
        for pending in list(self._pending.values()):
            self._close(pending)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _tick(self) -> None:
        """Wait for readiness (at most until the oldest deadline or 0.5 s), advance ready connections, take new
        ones, close expired ones."""
        timeout = 0.5
        if self._pending:
            oldest = next(iter(self._pending.values())).deadline  # deadlines follow insertion order
            timeout = max(0.0, min(timeout, oldest - time.monotonic()))
        for key, _mask in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            pending = self._pending.get(key.fileobj)  # type: ignore[arg-type]
            if pending is not None:
                self._advance(pending)
        self._take_new()
        now = time.monotonic()
        while self._pending and (oldest_pending := next(iter(self._pending.values()))).deadline <= now:
            what = "TLS handshake" if not oldest_pending.handshaken else "A-ASSOCIATE-RQ"
            self._drop(
                oldest_pending,
                "deadline",
                f"no complete {what} within {self.limits.request_timeout:g} s of connecting",
            )

    def _take_new(self) -> None:
        while True:
            try:
                sock, client_address = self._inbox.get_nowait()
            except queue.Empty:
                return
            address = str(client_address[0])
            if self._pending_by_address.get(address, 0) >= self.limits.max_per_address:
                self._note(
                    "connection_dropped",
                    "address_pending",
                    address,
                    f"{self.limits.max_per_address} connections from {address} are still negotiating",
                )
                _hard_close(sock)
                continue
            while len(self._pending) >= self.limits.max_pending:
                _, oldest = next(iter(self._pending.items()))
                self._drop(oldest, "evicted", f"{self.limits.max_pending} connections negotiating; oldest closed")
            try:
                sock.setblocking(False)
                handshaken = True
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    handshaken = False
            except (OSError, ValueError) as exc:
                self._note("connection_dropped", "socket", address, f"cannot set up the connection: {exc}")
                _hard_close(sock)
                continue
            pending = _Pending(
                sock=sock,
                address=address,
                client_address=client_address,
                deadline=time.monotonic() + self.limits.request_timeout,
                reader=RequestReader(self.limits.max_request_bytes),
                handshaken=handshaken,
            )
            try:
                self._selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError) as exc:
                self._note("connection_dropped", "socket", address, f"cannot watch the connection: {exc}")
                _hard_close(sock)
                continue
            self._pending[sock] = pending
            self._pending_by_address[address] = self._pending_by_address.get(address, 0) + 1
            self._advance(pending)  # a TLS handshake or data may be ready already

    def _watch(self, pending: _Pending, events: int) -> None:
        if pending.events != events:
            pending.events = events
            self._selector.modify(pending.sock, events)

    def _advance(self, pending: _Pending) -> None:
        sock = pending.sock
        if not pending.handshaken:
            try:
                sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                self._watch(pending, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._watch(pending, selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as exc:
                if peer_closed_silently(exc):  # a TCP probe or health check: like a plain early close
                    self._drop(pending, "closed", "connection closed during the TLS handshake")
                else:
                    self._drop(pending, "tls", f"TLS handshake failed: {describe_tls_error(exc)}")
                return
            pending.handshaken = True
            self._watch(pending, selectors.EVENT_READ)
        reader = pending.reader
        while not reader.complete:
            try:
                chunk = sock.recv(reader.wanted())
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._watch(pending, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                self._drop(pending, "closed", f"connection failed before a complete A-ASSOCIATE-RQ: {exc}")
                return
            if not chunk:
                self._drop(pending, "closed", "connection closed before a complete A-ASSOCIATE-RQ")
                return
            try:
                reader.feed(chunk)
            except RequestError as exc:
                self._drop(pending, "bad_request", str(exc), abort=exc.abort)
                return
        self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        self._forget(pending)
        try:
            request = decode_request(pending.reader.data)
        except RequestError as exc:
            self._note("connection_dropped", "bad_request", pending.address, str(exc))
            _send_and_close(pending.sock, abort_pdu(exc.abort or AbortReason.NOT_SPECIFIED))
            return
        calling = (request.calling_ae_title or "").strip()
        called = (request.called_ae_title or "").strip()
        try:
            refusal = self.admit(calling, called, pending.address) if self.admit else None
        except Exception:
            log.exception("admission check failed for %s", pending.address)
            refusal = Refusal(
                result=RejectResult.REJECTED_TRANSIENT,
                source=RejectSource.SERVICE_USER,
                reason=RejectReason.NO_REASON_GIVEN,
                detail="the admission check failed (see the log)",
            )
        kind = f"ae_title {calling!r}->{called!r}"  # each refused pair of AE titles gets its own first row
        if refusal is None:
            total, from_address = self.association_counts(pending.address)
            kind = "limit"
            if total >= self.limits.max_associations:
                refusal = local_limit(f"association limit {self.limits.max_associations} reached")
            elif from_address >= self.limits.max_per_address:
                refusal = local_limit(
                    f"{from_address} associations from {pending.address} already - the limit per address is "
                    f"{self.limits.max_per_address}"
                )
        if refusal is not None:
            self._note("association_rejected", kind, pending.address, refusal.detail, calling, called)
            _send_and_close(pending.sock, refusal.pdu())
            return
        try:
            pending.sock.setblocking(True)
            self.finish_request(_Handoff(pending.sock, pending.reader.data), pending.client_address)  # type: ignore
        except Exception:
            log.exception("could not start the association from %s", pending.address)
            _hard_close(pending.sock)

    def _forget(self, pending: _Pending) -> None:
        if self._pending.pop(pending.sock, None) is None:
            return
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError, OSError):
            pass
        left = self._pending_by_address.get(pending.address, 1) - 1
        if left:
            self._pending_by_address[pending.address] = left
        else:
            self._pending_by_address.pop(pending.address, None)

    def _close(self, pending: _Pending) -> None:
        self._forget(pending)
        _hard_close(pending.sock)

    def _drop(self, pending: _Pending, kind: str, detail: str, abort: AbortReason | None = None) -> None:
        self._forget(pending)
        if kind != "closed":  # a peer that went away by itself (a port scan, a health check) is not audited
            self._note("connection_dropped", kind, pending.address, detail)
        if abort is not None:
            _send_and_close(pending.sock, abort_pdu(abort))
        else:
            _hard_close(pending.sock)

    def _note(
        self, event: str, kind: str, address: str, detail: str, calling: str | None = None, called: str | None = None
    ) -> None:
        first = self._limiter.note(
            EdgeEvent(event=event, kind=kind, peer_address=address, detail=detail, calling_ae=calling, called_ae=called)
        )
        if first is not None:
            self._emit(first)

    def _emit(self, event: EdgeEvent) -> None:
        verb = "association rejected" if event.event == "association_rejected" else "connection dropped"
        suffix = "" if event.count == 1 else f" ({event.count} folded)"
        log.warning("%s: %s peer=%s%s", verb, event.detail, event.peer_address, suffix)
        self._writer.put(event)


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _send_and_close(sock: socket.socket, pdu: bytes) -> None:
    """Best effort: write a short PDU (fits any send buffer), half-close so the peer reads it, then close."""
    try:
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall(pdu)
        sock.shutdown(socket.SHUT_WR)
    except (OSError, ValueError):
        pass
    _hard_close(sock)


@dataclass(kw_only=True)
class EdgeConfig:
    """Everything :func:`start_edge_server` needs besides the AE."""

    address: tuple[str, int]
    limits: EdgeLimits
    admit: Admit | None = None
    audit: Callable[[EdgeEvent], None] | None = None
    ssl_context: ssl.SSLContext | None = None
    evt_handlers: list[Any] = field(default_factory=list)


def start_edge_server(ae: ApplicationEntity, config: EdgeConfig) -> EdgeServer:
    """Start ``ae`` as an association acceptor behind the edge guards, in a daemon thread (like
    ``AE.start_server(block=False)``); ``server.shutdown()`` stops it. Raises OSError when the address is taken."""

    def make(*args: Any, **kwargs: Any) -> EdgeServer:
        return EdgeServer(*args, **kwargs, limits=config.limits, admit=config.admit, audit=config.audit)

    server: EdgeServer = ae.make_server(
        config.address, ssl_context=config.ssl_context, evt_handlers=config.evt_handlers, server_class=make
    )
    thread = threading.Thread(target=server.serve_forever, name="chexd-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown() and server.shutdown() expect it there
    return server
