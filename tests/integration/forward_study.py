"""A study with result files queued for forwarding, written straight into a database and a data dir (no daemon):
a CR source image, a heatmap Secondary Capture and an Encapsulated PDF, their study/report/file rows and one
``forwards`` row per destination. Used by the forwarding tests (test_forward, test_tls)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.tables import Forward, ForwardState, ReportFile, ReportState, Study, StudyReportRow
from daemon.work.forward import enqueue
from tests.dicomgen import make_dataset, write_dataset

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
