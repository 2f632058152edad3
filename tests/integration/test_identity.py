"""Patient identity end to end: dcmtk storescu -> one chexd daemon (the tiny model, reports in-process) for the
whole module. Every hostile case is acknowledged (0x0000: the bytes are kept), held and never merged, and is followed
by a normal C-ECHO + C-STORE that succeeds; reports only ever name one patient; logs name none."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from typer.testing import CliRunner, Result

from daemon.cli import app
from daemon.store import queries
from daemon.store.db import session_factory
from daemon.store.tables import AuditEvent, IdentityConflict, Instance, ReportFile, Series, Study, StudyReportRow
from tests.conftest import DaemonProcess, running_daemon
from tests.dicomgen import make_dataset, write_dataset

# Distinctive values: the PHI check at the end looks for each of them in the daemon's log.
P1, P2, P3 = "IDT-7731-A", "IDT-7731-B", "IDT-7731-C"
NAMES = ("ROE^RICHARD", "DOE^JANE")
NORMAL_STUDY = generate_uid()  # the normal stores after each hostile case share one study (one report to write)


@pytest.fixture(scope="module")
def chexd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("identity")
    with running_daemon(
        root / "data", report_quiet_seconds="0.5", model_device="cpu", report_workers="0", worker_threads="2"
    ) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def engine(chexd: DaemonProcess) -> Iterator[Engine]:
    engine = chexd.engine()
    yield engine
    engine.dispose()


def send(chexd: DaemonProcess, tmp_path: Path, **kw: object) -> pydicom.Dataset:
    """storescu one dicomgen image; assert the daemon answered Success (0x0000). Returns the dataset sent."""
    kw.setdefault("rows", 96)
    kw.setdefault("columns", 96)
    ds = make_dataset(**kw)  # type: ignore[arg-type]
    path = write_dataset(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    result = chexd.storescu(str(path))
    assert result.returncode == 0 and "(Success)" in result.stdout + result.stderr, result.stderr
    return ds


def still_serving(chexd: DaemonProcess, engine: Engine, tmp_path: Path) -> None:
    """The normal C-ECHO + C-STORE after a hostile case: answered and stored."""
    assert chexd.echo()
    ds = send(chexd, tmp_path, study_uid=NORMAL_STUDY, patient_id=P3, seed=9)
    assert stored(engine, str(ds.SOPInstanceUID))


def cli(chexd: DaemonProcess, *args: str) -> Result:
    """``chexd ARGS`` against the daemon's database, in this process (a subprocess pays seconds of imports)."""
    env = {k: v for k, v in chexd.env.items() if k.startswith("CHEXD_")}
    return CliRunner().invoke(app, list(args), env=env)


def words(text: str) -> str:
    """Rich tables wrap at the console width: compare on single-spaced text."""
    return " ".join(text.split())


def stored(engine: Engine, sop_uid: str) -> str | None:
    """The Study UID the instance is filed under, or None."""
    with engine.connect() as conn:
        return conn.scalar(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == sop_uid)
        )


def conflicts(engine: Engine, sop_uid: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(IdentityConflict.kind, IdentityConflict.reason)
            .where(IdentityConflict.sop_instance_uid == sop_uid)
            .order_by(IdentityConflict.id)
        ).all()
    return [(str(kind), reason) for kind, reason in rows]


def audited(engine: Engine, sop_uid: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(AuditEvent.detail).where(
                    AuditEvent.event == "identity_conflict", AuditEvent.sop_instance_uid == sop_uid
                )
            )
        )


def done_report(engine: Engine, study_uid: str, timeout: float = 120) -> StudyReportRow:
    """The study's newest report once no revision is pending or being written."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(StudyReportRow)
                .join(Study, Study.id == StudyReportRow.study_id)
                .where(Study.study_instance_uid == study_uid)
                .order_by(StudyReportRow.revision)
            ).all()
        if rows and all(r.state in ("DONE", "SUPERSEDED", "FAILED") for r in rows):
            return rows[-1]
        assert time.monotonic() < deadline, f"no finished report for {study_uid}: {rows}"
        time.sleep(0.3)


def test_second_patient_in_a_known_study_is_held_and_the_report_names_only_the_first(
    chexd: DaemonProcess, engine: Engine, tmp_path: Path
) -> None:
    study = generate_uid()
    first = send(chexd, tmp_path, study_uid=study, patient_id=P1)
    second = send(chexd, tmp_path, study_uid=study, patient_id=P2, seed=1)  # acknowledged: its bytes are kept
    assert stored(engine, str(first.SOPInstanceUID)) == study
    assert stored(engine, str(second.SOPInstanceUID)) is None
    reason = "StudyInstanceUID already belongs to another patient (PatientID differs)"
    assert conflicts(engine, str(second.SOPInstanceUID)) == [("study", reason)]
    assert len(audited(engine, str(second.SOPInstanceUID))) == 1
    still_serving(chexd, engine, tmp_path)

    report = done_report(engine, study)
    assert report.state == "DONE", report.error
    assert report.instance_uids == [str(first.SOPInstanceUID)]
    with engine.connect() as conn:
        files = conn.execute(select(ReportFile.kind, ReportFile.path).where(ReportFile.report_id == report.id)).all()
    for kind, rel in files:
        path = chexd.data_dir / rel
        if kind == "pdf":
            text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True).stdout
            assert P1 in text and P2 not in text and str(second.SOPInstanceUID) not in text
        else:
            document = pydicom.dcmread(path)
            assert (document.PatientID, document.StudyInstanceUID) == (P1, study), kind
            assert str(second.SOPInstanceUID) not in str(document), kind

    shown = queries.show(session_factory(engine), study)  # what 'chexd show --json' prints
    assert [i["sop_instance_uid"] for i in shown["instances"]] == [str(first.SOPInstanceUID)]
    assert [(c["state"], c["reason"]) for c in shown["conflicts"]] == [("CONFLICT", reason)]
    text = words(cli(chexd, "show", str(second.SOPInstanceUID)).stdout)
    assert "CONFLICT" in text and "PatientID differs" in text


def test_series_reused_by_another_study_is_held_and_the_first_study_reports(
    chexd: DaemonProcess, engine: Engine, tmp_path: Path
) -> None:
    series = generate_uid()
    first = send(chexd, tmp_path, series_uid=series, patient_id=P1)
    other_study = generate_uid()
    second = send(chexd, tmp_path, study_uid=other_study, series_uid=series, patient_id=P1, seed=2)
    assert stored(engine, str(second.SOPInstanceUID)) is None
    [(kind, reason)] = conflicts(engine, str(second.SOPInstanceUID))
    assert kind == "series" and "SeriesInstanceUID already belongs to another study" in reason
    shown = words(cli(chexd, "show", other_study).stdout)
    assert f"conflict {other_study}: 0 instance(s)" in shown and "CONFLICT" in shown
    still_serving(chexd, engine, tmp_path)
    report = done_report(engine, str(first.StudyInstanceUID))
    assert report.state == "DONE" and report.instance_uids == [str(first.SOPInstanceUID)], report.error


def test_sop_resent_with_other_content_is_quarantined_identical_resend_is_a_duplicate(
    chexd: DaemonProcess, engine: Engine, tmp_path: Path
) -> None:
    uid = generate_uid()
    original = send(chexd, tmp_path, sop_uid=uid, patient_id=P1)
    study = str(original.StudyInstanceUID)
    send(chexd, tmp_path, sop_uid=uid, study_uid=study, series_uid=str(original.SeriesInstanceUID), patient_id=P1)
    assert conflicts(engine, uid) == [], "an identical resend is a silent duplicate"
    send(chexd, tmp_path, sop_uid=uid, patient_id=P2, seed=5)  # another patient's content under the same UID
    send(chexd, tmp_path, sop_uid=uid, study_uid=study, series_uid=str(original.SeriesInstanceUID), patient_id=P1,
         seed=6)  # same patient, other pixels
    assert conflicts(engine, uid) == [
        ("sop", "SOPInstanceUID already stored with different content (sha256 differs; another patient: PatientID "
                "differs)"),
        ("sop", "SOPInstanceUID already stored with different content (sha256 differs; same patient)"),
    ]
    assert len(audited(engine, uid)) == 2
    with engine.connect() as conn:
        held = list(conn.scalars(select(IdentityConflict.path).where(IdentityConflict.sop_instance_uid == uid)))
    for name in held:
        kept = pydicom.dcmread(chexd.data_dir / "quarantine" / name)
        assert str(kept.SOPInstanceUID) == uid
        assert (chexd.data_dir / "quarantine" / name.replace(".dcm", ".reason.txt")).exists()
    assert stored(engine, uid) == study
    spooled = pydicom.dcmread(next((chexd.data_dir / "spool").rglob(f"{uid}.dcm")))
    assert spooled.PatientID == P1 and spooled.PixelData == original.PixelData, "the stored instance is untouched"
    still_serving(chexd, engine, tmp_path)


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        ({"patient_id": P1}, {"patient_id": "", "patient_name": "", "patient_birth_date": ""},
         "this image has no patient identity"),
        ({"patient_id": "", "patient_name": "", "patient_birth_date": ""}, {"patient_id": P1},
         "the study's images have no patient identity"),
        ({"patient_id": "", "patient_name": NAMES[0], "patient_birth_date": "19700101"},
         {"patient_id": "", "patient_name": NAMES[1], "patient_birth_date": "19700101"},
         "no PatientID; PatientName/PatientBirthDate differ"),
        ({"patient_id": "00" + P1}, {"patient_id": P1}, "PatientID differs"),
    ],
    ids=["no-identity-into-identified", "identified-into-no-identity", "name-differs", "leading-zeros"],
)
def test_images_that_cannot_be_shown_to_be_one_patient_are_held(
    chexd: DaemonProcess, engine: Engine, tmp_path: Path, first: dict, second: dict, why: str
) -> None:
    study = generate_uid()
    a = send(chexd, tmp_path, study_uid=study, **first)
    b = send(chexd, tmp_path, study_uid=study, seed=3, **second)
    assert stored(engine, str(a.SOPInstanceUID)) == study
    assert stored(engine, str(b.SOPInstanceUID)) is None
    [(kind, reason)] = conflicts(engine, str(b.SOPInstanceUID))
    assert kind == "study" and why in reason
    still_serving(chexd, engine, tmp_path)


def test_images_without_any_identity_form_one_study(chexd: DaemonProcess, engine: Engine, tmp_path: Path) -> None:
    study = generate_uid()
    anonymous = {"patient_id": "", "patient_name": "", "patient_birth_date": ""}
    sent = [send(chexd, tmp_path, study_uid=study, seed=i, **anonymous) for i in range(2)]
    assert [stored(engine, str(ds.SOPInstanceUID)) for ds in sent] == [study, study]


def test_reprocess_of_a_held_image_refuses_and_it_stays_held(
    chexd: DaemonProcess, engine: Engine, tmp_path: Path
) -> None:
    study = generate_uid()
    send(chexd, tmp_path, study_uid=study, patient_id=P1)
    held = send(chexd, tmp_path, study_uid=study, patient_id=P2, seed=4)
    result = cli(chexd, "reprocess", str(held.SOPInstanceUID))
    assert result.exit_code == 1
    assert "held by an identity conflict - not re-queued" in words(result.output)
    assert stored(engine, str(held.SOPInstanceUID)) is None
    status = cli(chexd, "status")
    assert status.exit_code == 0 and "CONFLICT" in status.stdout
    assert "held by an identity conflict" in words(status.stdout)
    assert cli(chexd, "reprocess", study).exit_code == 0  # the study's own image is re-queued, the held one is not
    assert stored(engine, str(held.SOPInstanceUID)) is None
    still_serving(chexd, engine, tmp_path)


def test_the_log_names_no_patient(chexd: DaemonProcess) -> None:
    """Runs last in the module: every conflict above was logged by UID only."""
    log = chexd.log()
    assert "identity conflict: instance held" in log
    for value in (P1, P2, P3, *NAMES, "RICHARD", "JANE"):
        assert value not in log, value
