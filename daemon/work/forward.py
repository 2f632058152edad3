"""Forwarding: deliver DICOM result files (SR, SC, encapsulated PDF) to configured destinations by C-STORE.

Each (result file, destination) pair is one ``forwards`` row, added by :func:`enqueue` in the transaction that
records the files. :class:`ForwardLoop` claims due rows for one destination at a time and sends them over one
association (PS3.4 Annex B Storage Service Class, chexd as SCU). The table has no lease column, so claiming bumps
``attempts`` and pushes ``available_at`` past a lease: a daemon that dies mid-send leaves the rows to be retried
when the lease runs out, and ``attempts`` doubles as the fencing token that a finishing update must still match.

Outcome per file: success (0x0000) or warning (0xBxxx, PS3.4 B.2.3) → DONE; a failure status, an association
that cannot be opened or ends early → retry after ``forward_backoff_seconds * 2**(attempts - 1)`` (capped at
:data:`MAX_BACKOFF_SECONDS`); after ``forward_max_attempts`` tries, or at once when the file itself is unusable →
DEAD (a dead letter, shown by ``chexd status``/``chexd forward`` and re-queued by ``chexd forward --retry``).
Resending a file is harmless: result UIDs are deterministic, so a PACS files a duplicate onto the same instance.
A report revision enqueues only what is new or changed plus its new SR and Encapsulated PDF: a heatmap (SC, Parametric
Map) whose content did not change keeps its UID (reporting.uids.content_uid) and is recorded for the revision without a
forwards row (daemon.work.reports): so the PACS holds each (image, finding) map once; if an earlier delivery is DEAD,
``chexd forward --retry`` re-queues that earlier row.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.edge.tls import TLSFileError, client_handshake_error, forward_context
from daemon.settings import Settings
from daemon.store.nodes import this_holder
from daemon.store.spool import DiskGuard, DiskPause
from daemon.store.tables import Forward, ForwardState, ReportFile, utcnow
from daemon.work.loop import Loop

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_SIZE",
    "LEASE",
    "MAX_BACKOFF_SECONDS",
    "Destination",
    "ForwardLoop",
    "backoff_seconds",
    "enqueue",
    "forward_summary",
    "retry_dead",
    "status_outcome",
]

MAX_BACKOFF_SECONDS = 600.0
BATCH_SIZE = 16  # files per association (and per claim)
LEASE = timedelta(minutes=10)  # a claimed batch is retried after this if its sender never finishes
SUCCESS = 0x0000


@dataclass(frozen=True, kw_only=True, slots=True)
class Destination:
    """A C-STORE SCP: ``AE@host:port`` (IPv6 hosts in brackets); ``AE@host:port+tls`` is reached over DICOM TLS
    (``tls``: the server's certificate verified against ``tls_ca``, this node's ``tls_cert`` presented)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Raises ValueError naming the value when it is not ``AE@host:port[+tls]`` with a port in 1..65535."""
        body, plus, suffix = text.rpartition("+")
        tls = bool(plus) and suffix == "tls"
        if not tls:
            body = text
        ae, at, rest = body.partition("@")
        host, colon, port = rest.rpartition(":")
        if not (at and colon and ae.strip() and host and port.isdigit() and 1 <= int(port) <= 65535 and len(ae) <= 16):
            raise ValueError(
                f"Invalid destination {text!r} - expected 'AE@host:port' or 'AE@host:port+tls', "
                "e.g. 'PACS@10.0.0.5:104'"
            )
        return cls(ae_title=ae, host=host.strip("[]"), port=int(port), tls=tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}" + ("+tls" if self.tls else "")


def backoff_seconds(attempts: int, base: float) -> float:
    """Delay before the next try after ``attempts`` failed tries: ``base * 2**(attempts - 1)`` s, at most 600 s."""
    if attempts < 1:
        raise ValueError(f"Invalid attempts {attempts} - must be >= 1 (the delay follows a failed try)")
    return min(MAX_BACKOFF_SECONDS, base * 2.0 ** min(attempts - 1, 32))


def status_outcome(status: int) -> tuple[bool, str | None]:
    """Map a C-STORE response status (PS3.4 B.2.3, PS3.7 C) to (delivered, note).

    Success and warnings (0xBxxx) are delivered; the note names a warning. Everything else is a failure whose note
    names the status."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", "unknown status"))
    if status == SUCCESS:
        return True, None
    if status >> 12 == 0xB:
        return True, f"delivered with warning 0x{status:04X} ({meaning or category})"
    return False, f"C-STORE status 0x{status:04X} ({meaning or category})"


def enqueue(session: Session, report_file_id: int, destinations: Iterable[str]) -> int:
    """Add a QUEUED forward of one result file to each destination, in the caller's transaction.

    Idempotent: a (file, destination) pair that already has a row is left as it is (unique constraint, ON CONFLICT
    DO NOTHING on SQLite and PostgreSQL). Returns the number of rows added. Raises ValueError for a malformed
    destination."""
    wanted = list(dict.fromkeys(destinations))
    for text in wanted:
        Destination.parse(text)
    if not wanted:
        return 0
    now = utcnow()
    rows = [
        {
            "report_file_id": report_file_id,
            "destination": d,
            "state": ForwardState.QUEUED,
            "attempts": 0,
            "available_at": now,
        }
        for d in wanted
    ]
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        statement = dialect_insert(Forward).on_conflict_do_nothing(index_elements=["report_file_id", "destination"])
        added = 0
        for row in rows:  # one statement per row: executemany with RETURNING is not portable across drivers
            added += len(session.execute(statement.values(**row).returning(Forward.id)).all())
        return added
    existing = set(
        session.scalars(
            select(Forward.destination).where(Forward.report_file_id == report_file_id, Forward.destination.in_(wanted))
        )
    )
    missing = [r for r in rows if r["destination"] not in existing]
    if missing:
        session.execute(insert(Forward), missing)
    return len(missing)


def retry_dead(
    sessions: sessionmaker[Session], *, destination: str | None = None, include_retrying: bool = False
) -> int:
    """Re-queue dead letters (and, with ``include_retrying``, queued forwards waiting out a backoff) for an
    immediate try with attempts reset. Returns how many rows were re-queued; a running daemon sends them."""
    where = [Forward.state == ForwardState.DEAD]
    if include_retrying:
        where = [
            (Forward.state == ForwardState.DEAD)
            | ((Forward.state == ForwardState.QUEUED) & Forward.last_error.is_not(None))
        ]
    if destination is not None:
        where.append(Forward.destination == destination)
    with sessions.begin() as session:
        count = session.execute(
            update(Forward)
            .where(*where)
            .values(state=ForwardState.QUEUED, attempts=0, available_at=utcnow(), last_error=None)
            .execution_options(synchronize_session=False)
        ).rowcount
    if count:
        log.info("re-queued %d forward(s)%s", count, f" to {destination}" if destination else "")
    return int(count or 0)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def forward_summary(
    sessions: sessionmaker[Session],
    *,
    configured: Sequence[str] = (),
    destination: str | None = None,
    last_errors: int = 10,
) -> dict[str, Any]:
    """Forwards by destination and state, plus the newest dead letters and failing retries (JSON-able).

    ``destinations``: one entry per destination that has rows or is ``configured``, with counts of QUEUED (of which
    ``retrying`` have failed at least once), DONE and DEAD. ``dead`` and ``retrying``: newest first, at most
    ``last_errors`` each, with the result's SOP Instance UID, attempts and error. ``destination`` limits it all
    to one destination."""
    only = [Forward.destination == destination] if destination is not None else []
    if destination is not None:
        configured = [d for d in configured if d == destination]
    with sessions() as session:
        by_destination: dict[str, dict[str, Any]] = {}

        def entry(dest: str) -> dict[str, Any]:
            if dest not in by_destination:
                by_destination[dest] = {"destination": dest, "configured": dest in configured, "retrying": 0}
                by_destination[dest].update({state.value: 0 for state in ForwardState})
            return by_destination[dest]

        for dest in configured:
            entry(dest)
        for dest, state, n in session.execute(
            select(Forward.destination, Forward.state, func.count())
            .where(*only)
            .group_by(Forward.destination, Forward.state)
        ):
            entry(dest)[ForwardState(state).value] = n
        for dest, n in session.execute(
            select(Forward.destination, func.count())
            .where(Forward.state == ForwardState.QUEUED, Forward.last_error.is_not(None), *only)
            .group_by(Forward.destination)
        ):
            entry(dest)["retrying"] = n

        def listing(state: ForwardState) -> list[dict[str, Any]]:
            rows = session.execute(
                select(
                    Forward.destination,
                    ReportFile.sop_instance_uid,
                    ReportFile.kind,
                    Forward.attempts,
                    Forward.last_error,
                    Forward.available_at,
                )
                .join(ReportFile, Forward.report_file_id == ReportFile.id)
                .where(Forward.state == state, Forward.last_error.is_not(None), *only)
                .order_by(Forward.available_at.desc(), Forward.id.desc())
                .limit(last_errors)
            ).all()
            at_key = "at" if state is ForwardState.DEAD else "next_try_at"
            return [
                {
                    "destination": dest,
                    "sop_instance_uid": uid,
                    "kind": kind,
                    "attempts": attempts,
                    "error": error,
                    at_key: _iso(at),
                }
                for dest, uid, kind, attempts, error, at in rows
            ]

        totals = {state.value: 0 for state in ForwardState}
        for item in by_destination.values():
            for state in ForwardState:
                totals[state.value] += item[state.value]
        return {
            "destinations": sorted(by_destination.values(), key=lambda d: d["destination"]),
            "totals": totals,
            "dead": listing(ForwardState.DEAD),
            "retrying": listing(ForwardState.QUEUED),
        }


# --- sending --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimedForward:
    """One claimed row: ``attempts`` includes this try and must still match when the outcome is written."""

    forward_id: int
    attempts: int
    destination: str
    path: Path
    sop_instance_uid: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """Result of one try: ``delivered``; ``note`` (warning or error text); ``permanent`` failures never retry."""

    delivered: bool
    note: str | None = None
    permanent: bool = False


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def deliver(
    destination: Destination,
    items: Sequence[ClaimedForward],
    *,
    calling_ae: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> dict[int, Outcome]:
    """C-STORE every item's file over one association; return forward id -> Outcome (never raises for a peer or
    file problem). Files go as stored when the peer accepts their transfer syntax; an uncompressed file is
    re-encoded to another uncompressed syntax when that is all the peer accepts. A ``+tls`` destination needs
    ``tls`` (a client context, :func:`daemon.edge.tls.forward_context`); without one nothing is sent."""
    outcomes: dict[int, Outcome] = {}
    headers: list[tuple[ClaimedForward, UID, UID]] = []
    for item in items:
        try:
            meta = read_file_meta_info(item.path)
            headers.append((item, UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)))
        except FileNotFoundError:
            outcomes[item.forward_id] = Outcome(
                delivered=False, note=f"result file is missing: {item.path}", permanent=True
            )
        except Exception as exc:
            outcomes[item.forward_id] = Outcome(
                delivered=False, note=f"result file is not readable DICOM: {exc}", permanent=True
            )
    if not headers:
        return outcomes

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    contexts: dict[tuple[UID, UID], None] = {}
    for _, sop_class, ts in headers:
        contexts[(sop_class, ts)] = None
        if ts in _UNCOMPRESSED:
            for other in _UNCOMPRESSED:
                contexts[(sop_class, other)] = None
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    name = str(destination)
    if destination.tls and tls is None:
        for item, _, _ in headers:
            outcomes[item.forward_id] = Outcome(delivered=False, note=f"{name} needs TLS and no TLS context was given")
        return outcomes
    tls_args = (tls, destination.host) if destination.tls and tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "cannot reach the peer or association aborted"
        if tls_args is not None and not assoc.is_rejected:
            reason = client_handshake_error(tls_args[0], destination.host, destination.port, timeout=timeout)
            why = f"TLS handshake failed: {reason}" if reason else why
        for item, _, _ in headers:
            outcomes[item.forward_id] = Outcome(delivered=False, note=f"no association with {name}: {why}")
        return outcomes
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as stored (the same setting `chexd send` uses)
    try:
        for item, sop_class, ts in headers:
            if not assoc.is_established:
                outcomes[item.forward_id] = Outcome(delivered=False, note=f"association with {name} ended early")
                continue
            accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}
            try:
                if ts in accepted:
                    response = assoc.send_c_store(item.path)
                elif ts in _UNCOMPRESSED and accepted & set(_UNCOMPRESSED):
                    response = assoc.send_c_store(pydicom.dcmread(item.path))  # pynetdicom re-encodes
                else:
                    outcomes[item.forward_id] = Outcome(
                        delivered=False,
                        note=f"{name} accepted no presentation context for {sop_class.name} in {ts.name}",
                    )
                    continue
            except Exception as exc:
                outcomes[item.forward_id] = Outcome(delivered=False, note=f"C-STORE to {name} failed: {exc}")
                continue
            if "Status" not in response:
                outcomes[item.forward_id] = Outcome(
                    delivered=False, note=f"no C-STORE response from {name} (association aborted or timed out)"
                )
                continue
            delivered, note = status_outcome(int(response.Status))
            comment = response.get("ErrorComment")
            if comment and not delivered:
                note = f"{note}: {comment}"
            outcomes[item.forward_id] = Outcome(delivered=delivered, note=note)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


class ForwardLoop(Loop):
    """Background thread that delivers due forwards, one destination's batch per association.

    Only destinations in ``settings.forward_destinations`` are served: rows for a destination removed from the
    settings stay QUEUED (shown as not configured) rather than sending patient data somewhere no longer wanted.
    ``wake()`` after enqueueing skips the poll wait."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        data_dir: Path | None = None,
        *,
        guard: DiskGuard | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.data_dir = Path(data_dir) if data_dir is not None else settings.data_dir
        # Forwarding writes only database rows, but waits below the reserve like every writer (the database may
        # share the disk, and what it would record is worthless if the report that follows cannot be written).
        super().__init__("chexd-forward", disk=DiskPause(
            guard or DiskGuard(settings.disk_reserve_mb * 2**20), self.data_dir, "forwards"))
        self.holder = this_holder()  # forwards.claimed_by while this node sends them (taken over if it dies)

    def paused(self) -> bool:
        return bool(self.settings.forward_destinations) and super().paused()

    def poll_seconds(self) -> float:
        return self.settings.worker_poll_seconds

    def step(self, index: int) -> bool:
        return self.run_once()

    def claim(self, *, now: datetime | None = None) -> list[ClaimedForward]:
        """Claim up to BATCH_SIZE due QUEUED forwards of the destination whose oldest one is due first.

        One ``WITH c AS (SELECT … FOR UPDATE SKIP LOCKED) UPDATE … WHERE id IN c RETURNING`` (SQLite serialises it)
        bumps attempts and pushes available_at past the lease, so concurrent loops never share a row."""
        configured = list(self.settings.forward_destinations)
        if not configured:
            return []
        now = now or utcnow()
        due = (
            Forward.state == ForwardState.QUEUED,
            Forward.available_at <= now,
            Forward.destination.in_(configured),
        )
        with self.sessions.begin() as session:
            destination = session.scalar(
                select(Forward.destination).where(*due).order_by(Forward.available_at, Forward.id).limit(1)
            )
            if destination is None:
                return []
            # A materialised CTE: PostgreSQL may rescan a plain ``IN (SELECT … LIMIT … SKIP LOCKED)`` subquery
            # and, skipping the rows this statement already locked, take more than the limit.
            candidates = (
                select(Forward.id)
                .where(*due, Forward.destination == destination)
                .order_by(Forward.available_at, Forward.id)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
                .cte("candidates")
                .prefix_with("MATERIALIZED", dialect="postgresql")
            )
            rows = session.execute(
                update(Forward)
                .where(Forward.id.in_(select(candidates.c.id)), *due)
                .values(attempts=Forward.attempts + 1, available_at=now + LEASE, claimed_by=self.holder)
                .returning(Forward.id, Forward.attempts, Forward.report_file_id)
                .execution_options(synchronize_session=False)
            ).all()
            if not rows:
                return []
            files = {
                file_id: (path, uid)
                for file_id, path, uid in session.execute(
                    select(ReportFile.id, ReportFile.path, ReportFile.sop_instance_uid).where(
                        ReportFile.id.in_([r.report_file_id for r in rows])
                    )
                )
            }
        return [
            ClaimedForward(
                forward_id=r.id,
                attempts=r.attempts,
                destination=destination,
                path=self.data_dir / files[r.report_file_id][0],
                sop_instance_uid=files[r.report_file_id][1],
            )
            for r in sorted(rows, key=lambda r: r.id)
        ]

    def run_once(self) -> bool:
        """Claim and deliver one batch; False when nothing was due."""
        batch = self.claim()
        if not batch:
            return False
        destination = Destination.parse(batch[0].destination)
        tls: ssl.SSLContext | None = None
        if destination.tls:
            try:  # built per batch: a renewed certificate or CA file is picked up without a restart
                tls = forward_context(self.settings)
            except (TLSFileError, ssl.SSLError, OSError) as exc:
                note = f"cannot set up TLS for {destination}: {exc}"
                self._record(batch, {item.forward_id: Outcome(delivered=False, note=note) for item in batch})
                return True
        outcomes = deliver(
            destination,
            batch,
            calling_ae=self.settings.ae_title,
            timeout=min(self.settings.acse_timeout, self.settings.network_timeout),
            tls=tls,
        )
        self._record(batch, outcomes)
        return True

    def _record(self, batch: Sequence[ClaimedForward], outcomes: dict[int, Outcome]) -> None:
        now = utcnow()
        limit = self.settings.forward_max_attempts
        with self.sessions.begin() as session:
            for item in batch:
                outcome = outcomes.get(item.forward_id) or Outcome(delivered=False, note="not attempted")
                owned = (
                    Forward.id == item.forward_id,
                    Forward.state == ForwardState.QUEUED,
                    Forward.attempts == item.attempts,
                )
                if outcome.delivered:
                    values: dict[str, Any] = {"state": ForwardState.DONE, "sent_at": now, "last_error": outcome.note}
                elif outcome.permanent or item.attempts >= limit:
                    values = {"state": ForwardState.DEAD, "last_error": outcome.note, "available_at": now}
                else:
                    delay = backoff_seconds(item.attempts, self.settings.forward_backoff_seconds)
                    values = {"last_error": outcome.note, "available_at": now + timedelta(seconds=delay)}
                updated = session.execute(
                    update(Forward)
                    .where(*owned)
                    .values(**values, claimed_by=None)
                    .execution_options(synchronize_session=False)
                ).rowcount
                self._log(item, outcome, values, bool(updated), limit)

    @staticmethod
    def _log(item: ClaimedForward, outcome: Outcome, values: dict[str, Any], updated: bool, limit: int) -> None:
        uid = item.sop_instance_uid
        if not updated:
            log.warning("forward_id=%s changed while sending (re-queued?); outcome not recorded", item.forward_id)
        elif outcome.delivered:
            note = f" ({outcome.note})" if outcome.note else ""
            log.info("forwarded sop_instance_uid=%s to %s%s", uid, item.destination, note)
        elif values.get("state") is ForwardState.DEAD:
            log.error(
                "forward DEAD sop_instance_uid=%s to %s after %d attempt(s): %s - 'chexd forward --retry' re-queues",
                uid,
                item.destination,
                item.attempts,
                outcome.note,
            )
        else:
            log.warning(
                "forward failed sop_instance_uid=%s to %s (attempt %d of %d, next at %s): %s",
                uid,
                item.destination,
                item.attempts,
                limit,
                _iso(values["available_at"]),
                outcome.note,
            )
