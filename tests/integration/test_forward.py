"""Forwarding against real peers: a real Orthanc (Debian package) files the results into the original study; a
destination that is down is retried with backoff, goes dead, and ``chexd forward --retry`` delivers it once it is
up (SQLite and PostgreSQL). A pynetdicom SCP checks status mapping, one association per batch and re-encoding."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import typer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from daemon.cli.forward import forward
from daemon.edge import scu
from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.tables import Forward, ForwardState, ReportFile, ReportState, Study, StudyReportRow
from daemon.work.forward import ClaimedForward, Destination, ForwardLoop, deliver, enqueue, forward_summary
from tests.conftest import free_port
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.orthanc import OrthancServer

PATIENT = "CHEXD-FWD-0001"


def encapsulated_pdf(source: Dataset, pdf: bytes) -> Dataset:
    """A minimal Encapsulated PDF instance (PS3.3 A.45.1) in the source's study, patient attributes copied."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, getattr(source, keyword))
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 901
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.Manufacturer = "chexd"
    ds.ContentDate, ds.ContentTime = "20240115", "101600"
    ds.AcquisitionDateTime = "20240115101600"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "AI result - NOT FOR DIAGNOSIS"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj "
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


@dataclass
class Study1:
    """A source CR image and two results (Secondary Capture, Encapsulated PDF) of one study, as rows and files."""

    sessions: sessionmaker[Session]
    data_dir: Path
    source: Path
    study_uid: str
    results: dict[str, str]  # SOP Instance UID -> SOP Class UID

    def states(self) -> dict[str, tuple[ForwardState, int]]:
        """Result SOP Instance UID -> (forward state, attempts)."""
        with self.sessions() as session:
            rows = session.execute(
                select(ReportFile.sop_instance_uid, Forward.state, Forward.attempts).join(
                    ReportFile, Forward.report_file_id == ReportFile.id
                )
            ).all()
        return {uid: (ForwardState(state), attempts) for uid, state, attempts in rows}


def make_study(db_url: str, data_dir: Path, destinations: tuple[str, ...]) -> Study1:
    """Write the files under ``data_dir``, insert study/report/file rows and enqueue them in one transaction."""
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    study_uid = generate_uid()
    cr = make_dataset(sop_class=ComputedRadiographyImageStorage, study_uid=study_uid, patient_id=PATIENT)
    folder = data_dir / "reports" / "study-1" / "r1"
    folder.mkdir(parents=True)
    source = write_dataset(cr, data_dir / "source.dcm")
    sc = make_dataset(
        sop_class=SecondaryCaptureImageStorage, study_uid=study_uid, patient_id=PATIENT, instance_number=1, seed=3
    )
    sc.SeriesNumber = 900
    written = {
        "sc": write_dataset(sc, folder / "heatmap-sc.dcm"),
        "epdf": write_dataset(encapsulated_pdf(cr, MINIMAL_PDF), folder / "report-pdf.dcm"),
    }
    results = {}
    with sessions.begin() as session:
        study = Study(study_instance_uid=study_uid, study_date=cr.StudyDate)
        session.add(study)
        session.flush()
        report = StudyReportRow(
            study_id=study.id, revision=1, state=ReportState.DONE, instance_uids=[str(cr.SOPInstanceUID)]
        )
        session.add(report)
        session.flush()
        for kind, path in written.items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            row = ReportFile(
                report_id=report.id,
                kind=kind,
                path=str(path.relative_to(data_dir)),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
            )
            session.add(row)
            session.flush()
            assert enqueue(session, row.id, destinations) == len(destinations)
            results[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    return Study1(sessions=sessions, data_dir=data_dir, source=source, study_uid=study_uid, results=results)


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


def test_results_are_filed_into_the_original_study_in_orthanc(db_url: str, tmp_path: Path, started: list) -> None:
    pacs = OrthancServer(tmp_path / "orthanc").start()
    started.append(pacs)
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
    pacs = OrthancServer(tmp_path / "orthanc")  # ports chosen, not running yet
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
