"""Forwarding against real peers: a real Orthanc (Debian package) files the results into the original study; a
destination that is down is retried with backoff, goes dead, and ``chexd forward --retry`` delivers it once it is
up (SQLite and PostgreSQL). A pynetdicom SCP checks status mapping, one association per batch and re-encoding."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import typer
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    EncapsulatedPDFStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli.forward import forward
from daemon.edge import scu
from daemon.settings import Settings
from daemon.store.tables import Forward, ForwardState
from daemon.work.forward import ClaimedForward, Destination, ForwardLoop, deliver, forward_summary
from tests.conftest import free_port
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.forward_study import MINIMAL_PDF, PATIENT, encapsulated_pdf, make_study
from tests.integration.orthanc import OrthancServer


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def started() -> Iterator[list]:
    """Loops and Orthanc servers a test starts; all stopped at teardown."""
    things: list = []
    yield things
    for thing in reversed(things):
        thing.stop()


def test_results_are_filed_into_the_original_study_in_orthanc(
    db_url: str, tmp_path: Path, started: list, orthanc: OrthancServer
) -> None:
    pacs = orthanc
    data_dir = tmp_path / "data"
    study = make_study(db_url, data_dir, (pacs.destination,))
    source = pydicom.dcmread(study.source, stop_before_pixels=True)
    [sent] = scu.send([study.source], "127.0.0.1", pacs.dicom_port, called_ae="ORTHANC")  # the PACS has the image
    assert sent.ok

    settings = Settings(data_dir=data_dir, forward_destinations=(pacs.destination,), worker_poll_seconds=0.1)
    loop = ForwardLoop(study.sessions, settings)
    started.append(loop)
    loop.start()
    loop.wake()
    wait_for(lambda: {s for s, _ in study.states().values()} == {ForwardState.DONE}, 30, "both results DONE")

    filed = pacs.study_instances(study.study_uid)
    assert filed == {str(source.SOPInstanceUID): ComputedRadiographyImageStorage, **study.results}
    assert set(study.results.values()) == {SecondaryCaptureImageStorage, EncapsulatedPDFStorage}
    assert pacs.statistics()["CountStudies"] == 1  # no second study: the results joined the original one
    assert {a for _, a in study.states().values()} == {1}
    with study.sessions() as session:
        assert all(r.sent_at is not None and r.last_error is None for r in session.scalars(select(Forward)))
    summary = forward_summary(study.sessions, configured=settings.forward_destinations)
    assert summary["totals"] == {"QUEUED": 0, "DONE": 2, "DEAD": 0} and summary["dead"] == []


def invoke_forward(env: dict[str, str], *args: str) -> str:
    """``chexd forward ARGS`` through typer (the command the lead registers on daemon.cli.root.app)."""
    app = typer.Typer()
    app.command()(forward)
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_down_destination_backs_off_goes_dead_and_retry_delivers_once_up(
    db_url: str, tmp_path: Path, started: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.work.forward")
    pacs = OrthancServer(tmp_path / "orthanc")  # ports chosen, not running yet (its own server, not the session's)
    started.append(pacs)
    data_dir = tmp_path / "data"
    study = make_study(db_url, data_dir, (pacs.destination,))
    settings = Settings(
        data_dir=data_dir,
        forward_destinations=(pacs.destination,),
        forward_max_attempts=3,
        forward_backoff_seconds=0.05,
        worker_poll_seconds=0.05,
    )
    loop = ForwardLoop(study.sessions, settings)
    started.append(loop)
    loop.start()
    wait_for(lambda: {s for s, _ in study.states().values()} == {ForwardState.DEAD}, 30, "both results DEAD")
    assert set(study.states().values()) == {(ForwardState.DEAD, 3)}

    messages = [r.getMessage() for r in caplog.records if r.name == "daemon.work.forward"]
    for uid in study.results:
        tries = [m for m in messages if uid in m]
        assert [("attempt 1 of 3" in m, "attempt 2 of 3" in m, "DEAD" in m) for m in tries] == [
            (True, False, False),
            (False, True, False),
            (False, False, True),
        ], tries
        assert all(pacs.destination in m and "no association" in m for m in tries)
    assert not any(PATIENT in m or "Test^Chest" in m for m in messages)  # UIDs only, never patient data

    env = {
        "CHEXD_DATA_DIR": str(data_dir),
        "CHEXD_DATABASE_URL": db_url,
        "CHEXD_FORWARD_DESTINATIONS": pacs.destination,
        "CHEXD_PORT": str(free_port()),  # no chexd listens there
    }
    shown = json.loads(invoke_forward(env, "--json"))
    assert shown["totals"] == {"QUEUED": 0, "DONE": 0, "DEAD": 2}
    assert {e["sop_instance_uid"] for e in shown["dead"]} == set(study.results)
    assert all(e["attempts"] == 3 and "no association" in e["error"] for e in shown["dead"])
    table = invoke_forward(env)
    assert "dead letters" in table and "chexd forward --retry" in table

    pacs.start()
    retried = invoke_forward(env, "--retry")
    assert "re-queued 2 dead letter(s)" in retried and "they wait until 'chexd serve' runs" in retried
    loop.wake()
    wait_for(lambda: {s for s, _ in study.states().values()} == {ForwardState.DONE}, 30, "both results DONE")
    assert set(study.states().values()) == {(ForwardState.DONE, 1)}  # attempts were reset by --retry
    assert pacs.study_instances(study.study_uid) == study.results
    assert json.loads(invoke_forward(env, "--retry", "--json")) == {"requeued": 0, "daemon_listening": False}


def test_deliver_maps_statuses_uses_one_association_and_re_encodes_for_the_peer(tmp_path: Path) -> None:
    """A pynetdicom SCP that accepts Secondary Capture in Implicit VR only and answers each instance's status."""
    statuses = {}
    paths = []
    for i, status in enumerate((0x0000, 0xB000, 0xA700)):
        ds = make_dataset(sop_class=SecondaryCaptureImageStorage, seed=i)
        statuses[str(ds.SOPInstanceUID)] = status
        paths.append(write_dataset(ds, tmp_path / f"sc{i}.dcm"))  # Explicit VR Little Endian
    pdf = write_dataset(encapsulated_pdf(make_dataset(), MINIMAL_PDF), tmp_path / "pdf.dcm")
    received: dict[str, str] = {}
    associations: list[str] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        received[str(ds.SOPInstanceUID)] = str(event.context.transfer_syntax)
        return statuses[str(ds.SOPInstanceUID)]

    ae = AE(ae_title="PEER")
    ae.add_supported_context(SecondaryCaptureImageStorage, ImplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, lambda e: associations.append("x"))],
    )
    try:
        items = [
            ClaimedForward(forward_id=i, attempts=1, destination=f"PEER@127.0.0.1:{port}", path=p, sop_instance_uid="")
            for i, p in enumerate([*paths, pdf])
        ]
        outcomes = deliver(Destination.parse(items[0].destination), items, calling_ae="CHEXD", timeout=10)
    finally:
        server.shutdown()
    assert len(associations) == 1
    assert set(received.values()) == {ImplicitVRLittleEndian} and set(received) == set(statuses)
    assert outcomes[0].delivered and outcomes[0].note is None
    assert outcomes[1].delivered and "0xB000" in (outcomes[1].note or "")
    assert not outcomes[2].delivered and "0xA700" in (outcomes[2].note or "")
    assert not outcomes[3].delivered and not outcomes[3].permanent
    assert "accepted no presentation context for Encapsulated PDF Storage" in (outcomes[3].note or "")
