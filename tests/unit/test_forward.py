"""daemon.work.forward without a PACS: destinations, backoff, status mapping, enqueue, claiming, outcomes, dead letters
and the summary (SQLite and real PostgreSQL). Delivery to real peers is in tests/integration/test_forward.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.tables import Forward, ForwardState, ReportFile, ReportState, Study, StudyReportRow, utcnow
from daemon.work import forward as forward_module
from daemon.work.forward import (
    BATCH_SIZE,
    LEASE,
    MAX_BACKOFF_SECONDS,
    ClaimedForward,
    Destination,
    ForwardLoop,
    Outcome,
    backoff_seconds,
    deliver,
    enqueue,
    forward_summary,
    retry_dead,
    status_outcome,
)
from tests.conftest import free_port

PACS = "PACS@127.0.0.1:104"
ARCHIVE = "ARCHIVE@10.0.0.7:11112"
ROOT = "1.2.826.0.1.3680043.10.9998"


def test_destination_parse_accepts_ae_host_port_and_bracketed_ipv6() -> None:
    assert Destination.parse("PACS@10.0.0.5:104") == Destination(ae_title="PACS", host="10.0.0.5", port=104)
    assert Destination.parse("A B@[::1]:4242") == Destination(ae_title="A B", host="::1", port=4242)


@pytest.mark.parametrize(
    "text", ["PACS", "PACS@host", "@host:104", "PACS@:104", "PACS@host:0", "PACS@host:70000", "A" * 17 + "@h:1"]
)
def test_destination_parse_rejects_malformed_entries_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match="expected 'AE@host:port'") as info:
        Destination.parse(text)
    assert repr(text) in str(info.value)


def test_backoff_doubles_from_the_base_and_is_capped_at_ten_minutes() -> None:
    assert [backoff_seconds(n, 2.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_seconds(9, 2.0) == 512.0
    assert backoff_seconds(10, 2.0) == MAX_BACKOFF_SECONDS == 600.0
    assert backoff_seconds(10_000, 0.5) == 600.0
    with pytest.raises(ValueError, match="attempts 0"):
        backoff_seconds(0, 2.0)


def test_status_mapping_success_and_warnings_deliver_failures_do_not() -> None:
    assert status_outcome(0x0000) == (True, None)
    for warning in (0xB000, 0xB006, 0xB007):
        delivered, note = status_outcome(warning)
        assert delivered and note is not None and f"0x{warning:04X}" in note and "warning" in note
    for failure, meaning in (
        (0xA700, "Out of Resources"),
        (0xA900, "Does Not Match"),
        (0xC000, "Cannot Understand"),
        (0x0122, "SOP Class Not Supported"),
        (0x0211, "Unrecognised Operation"),
    ):
        delivered, note = status_outcome(failure)
        assert not delivered and note is not None
        assert f"0x{failure:04X}" in note and meaning in note
    assert status_outcome(0xFFF1)[0] is False


# --- database --------------------------------------------------------------------------------------------------------


@dataclass
class Env:
    engine: Engine
    sessions: sessionmaker[Session]
    data_dir: Path
    files: int = 0

    def add_file(self, kind: str = "sr") -> int:
        """A DONE report revision of a new study with one result file; returns the file's id."""
        self.files += 1
        n = self.files
        with self.sessions.begin() as session:
            study = Study(study_instance_uid=f"{ROOT}.{n}")
            session.add(study)
            session.flush()
            report = StudyReportRow(study_id=study.id, revision=1, state=ReportState.DONE)
            session.add(report)
            session.flush()
            row = ReportFile(
                report_id=report.id,
                kind=kind,
                path=f"reports/study-{study.id}/r1/{kind}.dcm",
                sha256="0" * 64,
                sop_instance_uid=f"{ROOT}.{n}.9",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            )
            session.add(row)
            session.flush()
            return row.id

    def queue(self, destinations: Sequence[str] = (PACS,), kind: str = "sr") -> int:
        file_id = self.add_file(kind)
        with self.sessions.begin() as session:
            enqueue(session, file_id, destinations)
        return file_id

    def rows(self) -> list[Forward]:
        with self.sessions() as session:
            return list(session.scalars(select(Forward).order_by(Forward.id)))

    def loop(self, **settings: object) -> ForwardLoop:
        values: dict[str, object] = {"data_dir": self.data_dir, "forward_destinations": (PACS, ARCHIVE)}
        values.update(settings)
        return ForwardLoop(self.sessions, Settings(**values))  # type: ignore[arg-type]


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    yield Env(engine, session_factory(engine), tmp_path / "data")
    engine.dispose()


def test_enqueue_adds_one_queued_row_per_destination_and_is_idempotent(env: Env) -> None:
    file_id = env.add_file()
    with env.sessions.begin() as session:
        assert enqueue(session, file_id, [PACS, ARCHIVE, PACS]) == 2
    with env.sessions.begin() as session:
        assert enqueue(session, file_id, [ARCHIVE, PACS]) == 0  # already there: left as they are
    rows = env.rows()
    assert sorted(r.destination for r in rows) == sorted([PACS, ARCHIVE])
    assert {(r.state, r.attempts, r.report_file_id) for r in rows} == {(ForwardState.QUEUED, 0, file_id)}


def test_enqueue_rejects_a_malformed_destination_before_adding_anything(env: Env) -> None:
    file_id = env.add_file()
    with pytest.raises(ValueError, match="'nowhere'"), env.sessions.begin() as session:
        enqueue(session, file_id, [PACS, "nowhere"])
    assert env.rows() == []


def test_claim_takes_due_rows_of_one_configured_destination_bumping_attempts_and_lease(env: Env) -> None:
    env.queue([PACS])
    env.queue([ARCHIVE])
    env.queue([PACS])
    env.queue(["GONE@10.9.9.9:104"])  # no longer configured: never claimed
    loop = env.loop()
    before = utcnow()
    first = loop.claim()
    assert [c.destination for c in first] == [PACS, PACS]
    assert all(c.attempts == 1 and c.path.is_relative_to(env.data_dir) for c in first)
    assert [c.sop_instance_uid for c in first] == [f"{ROOT}.1.9", f"{ROOT}.3.9"]
    second = loop.claim()
    assert [c.destination for c in second] == [ARCHIVE]
    assert loop.claim() == []
    for row in env.rows():
        if row.destination == "GONE@10.9.9.9:104":
            assert row.attempts == 0
        else:
            assert row.state is ForwardState.QUEUED and row.attempts == 1
            assert row.available_at >= before + LEASE - timedelta(seconds=1)


def test_claim_leaves_rows_waiting_out_a_backoff_and_done_or_dead_rows(env: Env) -> None:
    for _ in range(3):
        env.queue([PACS])
    later = utcnow() + timedelta(minutes=1)
    with env.sessions.begin() as session:
        ids = [r.id for r in session.scalars(select(Forward).order_by(Forward.id))]
        session.execute(update(Forward).where(Forward.id == ids[0]).values(available_at=later))
        session.execute(update(Forward).where(Forward.id == ids[1]).values(state=ForwardState.DONE))
        session.execute(update(Forward).where(Forward.id == ids[2]).values(state=ForwardState.DEAD))
    loop = env.loop()
    assert loop.claim() == []
    assert [c.forward_id for c in loop.claim(now=later)] == [ids[0]]


def test_claim_batches_at_most_batch_size(env: Env) -> None:
    for _ in range(BATCH_SIZE + 2):
        env.queue([PACS])
    loop = env.loop()
    assert len(loop.claim()) == BATCH_SIZE
    assert len(loop.claim()) == 2


def test_a_crashed_senders_lease_expires_and_the_rows_are_claimed_again(env: Env) -> None:
    env.queue([PACS])
    loop = env.loop()
    assert [c.attempts for c in loop.claim()] == [1]  # ... and the sender dies here
    assert loop.claim() == []
    again = loop.claim(now=utcnow() + LEASE + timedelta(seconds=1))
    assert [c.attempts for c in again] == [2]


def test_concurrent_loops_never_claim_the_same_forward(env: Env) -> None:
    for _ in range(40):
        env.queue([PACS])
    loops = [env.loop() for _ in range(4)]
    claimed: list[list[int]] = [[] for _ in loops]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(loops))

    def run(i: int) -> None:
        try:
            barrier.wait()
            while batch := loops[i].claim():
                claimed[i].extend(c.forward_id for c in batch)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(loops))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    everything = sorted(i for ids in claimed for i in ids)
    assert everything == [r.id for r in env.rows()]  # each exactly once
    assert {r.attempts for r in env.rows()} == {1}


def fake_deliver(monkeypatch: pytest.MonkeyPatch, outcome: Outcome | None) -> list[list[ClaimedForward]]:
    """Replace the C-STORE step: every item gets ``outcome`` (None: the item is left out of the answer)."""
    calls: list[list[ClaimedForward]] = []

    def deliver(destination: Destination, items: Sequence[ClaimedForward], **_: object) -> dict[int, Outcome]:
        calls.append(list(items))
        return {} if outcome is None else {item.forward_id: outcome for item in items}

    monkeypatch.setattr(forward_module, "deliver", deliver)
    return calls


def test_delivered_marks_done_with_sent_at_and_keeps_a_warning(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.queue([PACS])
    calls = fake_deliver(monkeypatch, Outcome(delivered=True, note="delivered with warning 0xB000"))
    assert env.loop().run_once() is True
    assert len(calls) == 1
    [row] = env.rows()
    assert row.state is ForwardState.DONE and row.sent_at is not None and row.attempts == 1
    assert row.last_error == "delivered with warning 0xB000"
    assert env.loop().run_once() is False


def test_failures_back_off_exponentially_then_go_dead_after_max_attempts(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.queue([PACS])
    fake_deliver(monkeypatch, Outcome(delivered=False, note="no association with PACS: refused"))
    loop = env.loop(forward_max_attempts=3, forward_backoff_seconds=5.0)
    waits = []
    for attempt in (1, 2):
        before = utcnow()
        assert loop.run_once() is True
        [row] = env.rows()
        assert (row.state, row.attempts, row.last_error) == (
            ForwardState.QUEUED,
            attempt,
            "no association with PACS: refused",
        )
        waits.append((row.available_at - before).total_seconds())
        assert loop.run_once() is False  # not due yet
        with env.sessions.begin() as session:  # let the backoff pass
            session.execute(update(Forward).values(available_at=utcnow()))
    assert 5.0 <= waits[0] < 6.0 and 10.0 <= waits[1] < 11.0
    assert loop.run_once() is True
    [row] = env.rows()
    assert (row.state, row.attempts) == (ForwardState.DEAD, 3)
    assert loop.run_once() is False  # dead letters are not retried by the loop


def test_permanent_failure_goes_dead_at_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.queue([PACS])
    fake_deliver(monkeypatch, Outcome(delivered=False, note="result file is missing: x.dcm", permanent=True))
    env.loop(forward_max_attempts=8).run_once()
    [row] = env.rows()
    assert (row.state, row.attempts, row.last_error) == (ForwardState.DEAD, 1, "result file is missing: x.dcm")


def test_an_item_without_an_outcome_counts_as_a_failed_try(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.queue([PACS])
    fake_deliver(monkeypatch, None)
    env.loop().run_once()
    [row] = env.rows()
    assert (row.state, row.attempts, row.last_error) == (ForwardState.QUEUED, 1, "not attempted")


def test_an_outcome_for_a_row_requeued_meanwhile_is_not_recorded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.queue([PACS])
    loop = env.loop()
    [claimed] = loop.claim()
    with env.sessions.begin() as session:  # e.g. 'chexd forward --retry --now' while the send was in flight
        session.execute(update(Forward).values(attempts=0, available_at=utcnow()))
    loop._record([claimed], {claimed.forward_id: Outcome(delivered=False, note="late")})
    [row] = env.rows()
    assert (row.state, row.attempts, row.last_error) == (ForwardState.QUEUED, 0, None)


def test_retry_dead_requeues_dead_letters_now_with_attempts_reset(env: Env) -> None:
    for destination in (PACS, PACS, ARCHIVE, ARCHIVE):
        env.queue([destination])
    later = utcnow() + timedelta(minutes=5)
    with env.sessions.begin() as session:
        ids = [r.id for r in session.scalars(select(Forward).order_by(Forward.id))]
        session.execute(
            update(Forward).where(Forward.id.in_(ids[:3])).values(state=ForwardState.DEAD, attempts=8, last_error="x")
        )
        session.execute(
            update(Forward).where(Forward.id == ids[3]).values(attempts=2, last_error="busy", available_at=later)
        )
    assert retry_dead(env.sessions, destination=ARCHIVE) == 1
    assert retry_dead(env.sessions) == 2
    assert retry_dead(env.sessions) == 0
    rows = env.rows()
    assert [(r.state, r.attempts, r.last_error) for r in rows[:3]] == [(ForwardState.QUEUED, 0, None)] * 3
    assert all(r.available_at <= utcnow() for r in rows[:3])
    assert (rows[3].attempts, rows[3].last_error) == (2, "busy")  # waiting out a backoff: untouched by default
    assert retry_dead(env.sessions, include_retrying=True) == 1
    assert (env.rows()[3].attempts, env.rows()[3].available_at <= utcnow()) == (0, True)


def test_summary_counts_by_destination_and_lists_dead_letters_and_retries(env: Env) -> None:
    assert forward_summary(env.sessions) == {
        "destinations": [],
        "totals": {"QUEUED": 0, "DONE": 0, "DEAD": 0},
        "dead": [],
        "retrying": [],
    }
    for destination in (PACS, PACS, PACS, ARCHIVE):
        env.queue([destination], kind="sc")
    with env.sessions.begin() as session:
        ids = [r.id for r in session.scalars(select(Forward).order_by(Forward.id))]
        session.execute(update(Forward).where(Forward.id == ids[0]).values(state=ForwardState.DONE, attempts=1))
        session.execute(
            update(Forward)
            .where(Forward.id == ids[1])
            .values(state=ForwardState.DEAD, attempts=8, last_error="C-STORE status 0xA700 (Refused: Out of Resources)")
        )
        session.execute(update(Forward).where(Forward.id == ids[3]).values(attempts=2, last_error="refused"))
    summary = forward_summary(env.sessions, configured=(PACS, "NEW@10.1.1.1:104"))
    assert summary["totals"] == {"QUEUED": 2, "DONE": 1, "DEAD": 1}
    by_name = {d["destination"]: d for d in summary["destinations"]}
    assert by_name[PACS] | {} == {
        "destination": PACS,
        "configured": True,
        "QUEUED": 1,
        "retrying": 0,
        "DONE": 1,
        "DEAD": 1,
    }
    assert by_name[ARCHIVE]["configured"] is False and by_name[ARCHIVE]["retrying"] == 1
    assert by_name["NEW@10.1.1.1:104"]["QUEUED"] == 0  # configured, nothing sent yet: still listed
    [dead] = summary["dead"]
    assert dead["sop_instance_uid"] == f"{ROOT}.2.9" and dead["kind"] == "sc" and dead["attempts"] == 8
    assert "0xA700" in dead["error"] and dead["at"]
    [retrying] = summary["retrying"]
    assert retrying["destination"] == ARCHIVE and retrying["error"] == "refused" and retrying["next_try_at"]
    only = forward_summary(env.sessions, configured=(PACS,), destination=ARCHIVE)
    assert [d["destination"] for d in only["destinations"]] == [ARCHIVE] and only["dead"] == []


# --- deliver without a peer ------------------------------------------------------------------------------------------


def test_deliver_fails_a_missing_file_permanently_without_connecting(tmp_path: Path) -> None:
    item = ClaimedForward(
        forward_id=7, attempts=1, destination=PACS, path=tmp_path / "gone.dcm", sop_instance_uid="1.2.3"
    )
    outcome = deliver(Destination.parse(PACS), [item], calling_ae="CHEXD", timeout=5)[7]
    assert not outcome.delivered and outcome.permanent and "missing" in (outcome.note or "")


def test_deliver_to_a_closed_port_is_a_transient_failure(tmp_path: Path) -> None:
    from tests.dicomgen import make_dataset, write_dataset

    path = write_dataset(make_dataset(), tmp_path / "a.dcm")
    destination = f"PACS@127.0.0.1:{free_port()}"
    item = ClaimedForward(forward_id=1, attempts=1, destination=destination, path=path, sop_instance_uid="1")
    outcome = deliver(Destination.parse(destination), [item], calling_ae="CHEXD", timeout=5)[1]
    assert not outcome.delivered and not outcome.permanent
    assert "no association with " + destination in (outcome.note or "")
