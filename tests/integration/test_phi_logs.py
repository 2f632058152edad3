"""No patient data in the daemon's log under hostile names, and their reports are written (daemon/logsafety.py).

One daemon (SQLite, log level DEBUG, two report worker processes) receives phantoms whose patient attributes are the
values that leaked or broke reports in the issue-12 probe: a PatientName without '^' (highdicom warns with it), a
ReferringPhysicianName "Dr Who", a 10,000-character PatientName (reportlab LayoutError: the report was lost), names in
Cyrillic/Greek (ISO_IR 192) and Japanese (ISO 2022 IR 87, a first value left empty). tests/conftest.py checks every
daemon log of the suite for the test patients' names and IDs; this test adds the assertions that the warnings were
kept (with their values redacted) and that every report was written.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from daemon.logsafety import REDACTED
from daemon.store.tables import ReportFile, StudyReportRow
from model.phantom import generate, to_dicom
from tests.conftest import phi_in_log
from tests.integration.peers import wait_for_reports, wait_until_processed

LONG_NAME = "LANGERNAME" * 1000  # 10,000 characters, one component
CASES = {
    "no_caret": {"PatientName": "MUSTERMANN MAX", "ReferringPhysicianName": "Dr Who", "PatientID": "PHI-ID-123"},
    "long": {"PatientName": LONG_NAME, "PatientID": "PHI-ID-123"},
    "cyrillic_greek": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Иванов^Иван",
                       "ReferringPhysicianName": "Παπαδόπουλος^Γιάννης", "PatientID": "PHI-ID-123"},
    "japanese": {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Suzuki^Ichiro=鈴木^一郎",
                 "PatientID": "PHI-ID-123"},
}


def _hostile(folder: Path) -> dict[str, Path]:
    """One phantom per case (each its own study; effusion forced present, so each report has a heatmap SC)."""
    paths = {}
    for index, (case, attributes) in enumerate(CASES.items()):
        ds = to_dicom(generate(0, index, size=384, force={"Effusion": True}))
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        paths[case] = folder / f"{case}.dcm"
        ds.save_as(paths[case], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_hostile_names_reach_no_log_and_every_report_is_written(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(report_quiet_seconds="0.3", model_device="cpu", log_level="DEBUG", report_workers="2",
                         model="demo")
    files = _hostile(tmp_path)
    sent = daemon.storescu(*map(str, files.values()))
    assert sent.returncode == 0, sent.stderr
    engine = daemon.engine()
    assert sorted(wait_until_processed(engine, len(files), timeout=120).values()) == ["DONE"] * len(files)
    reports = wait_for_reports(engine, timeout=120, n=len(files))
    assert [(r.state, r.error) for r in reports] == [("DONE", None)] * len(files)

    with engine.connect() as conn:
        pdfs = [daemon.data_dir / p for (p,) in conn.execute(select(ReportFile.path).where(ReportFile.kind == "pdf"))]
        assert len(conn.execute(select(StudyReportRow.id)).all()) == len(files)
    texts = [subprocess.run(["pdftotext", str(p), "-"], capture_output=True, text=True, check=True).stdout
             for p in pdfs]
    flat = [" ".join(t.split()) for t in texts]
    (long_text,) = [t for t in flat if "LANGERNAME" in t]
    packed = "".join(long_text.split())  # the clipped name wraps over lines in its cell
    assert LONG_NAME[:63] + "…" in packed and LONG_NAME[:64] not in packed, "the 10,000-character name is clipped"
    note = "font cannot show are printed as '?'"
    assert sum(note in t for t in flat) == 2, "Cyrillic and Japanese names: '?' where the font has no glyph, said so"

    names = {str(pydicom.dcmread(daemon.data_dir / p, stop_before_pixels=True).PatientName)
             for kind in ("sr", "sc", "epdf") for p in _paths(engine, kind)}
    assert {"Suzuki^Ichiro=鈴木^一郎", "Иванов^Иван"} <= names, "names in any script survive into the documents"

    daemon.stop()
    log = daemon.log()
    assert phi_in_log(log) == []
    for case in CASES.values():
        for keyword in ("PatientName", "ReferringPhysicianName", "PatientID"):
            for part in str(case.get(keyword, "")).replace("=", "^").split("^"):
                assert not part or part[:20] not in log, keyword
    assert "is unlikely to represent the intended person name" in log, "highdicom's warning is kept..."
    assert f'The string "{REDACTED}"' in log, "...without the name"
    assert "report written" in log


def _paths(engine, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return [p for (p,) in conn.execute(select(ReportFile.path).where(ReportFile.kind == kind))]
