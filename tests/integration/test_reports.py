"""End to end: storescu → worker → study report (PDF, SR, heatmap SC, encapsulated PDF) → rows → a real Orthanc.

The tests that need findings (heatmaps for a present effusion) run the bundled demo model (synthetic, not for
diagnosis) on phantom images whose findings are known; the others run the suite's tiny model.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from daemon.store.tables import FindingRow
from model.phantom import generate, to_dicom
from tests.dicomgen import make_dataset, write_dataset
from tests.integration.orthanc import OrthancServer
from tests.integration.peers import report_files, wait_for_reports, wait_until_processed

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _phantom(tmp_path: Path, index: int, name: str, **kw: str) -> Path:
    """Phantom ``index`` (seed 0) with pleural effusion forced present: the demo model finds it (p > 0.9)."""
    ds = to_dicom(generate(0, index, size=384, force={"Effusion": True}), **kw)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _errors(tool: str, *paths: Path) -> list[str]:
    result = subprocess.run([tool, *map(str, paths)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_a_phantom_with_effusion_gets_pdf_sr_and_sc_that_validate(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(report_quiet_seconds="0.5", model_device="cpu", model="demo")
    source = _phantom(tmp_path, 0, "effusion.dcm")
    assert daemon.storescu(str(source)).returncode == 0
    engine = daemon.engine()
    assert list(wait_until_processed(engine, 1).values()) == ["DONE"]
    (report,) = wait_for_reports(engine)
    assert report.state == "DONE" and report.revision == 1, report.error
    files = report_files(engine, report.id)
    assert sorted(files) == ["epdf", "pdf", "pm", "sc", "sr"]
    data = daemon.data_dir
    sr_path, pdf_path = data / files["sr"][0], data / files["pdf"][0]
    sc_paths = [data / p for p in files["sc"]]
    assert any("Effusion" in p.name for p in sc_paths), "a heatmap SC for the finding that is present"
    pm_paths = [data / p for p in files["pm"]]  # the same heatmaps as Parametric Maps (reporting.pmap)
    assert sorted(p.name.replace("pm-", "") for p in pm_paths) == sorted(p.name.replace("sc-", "") for p in sc_paths)

    for path in [sr_path, data / files["epdf"][0], *sc_paths, *pm_paths]:
        assert _errors("dciodvfy", path) == [], path.name
    assert _errors("dcentvfy", source, sr_path, data / files["epdf"][0], *sc_paths, *pm_paths) == []

    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, check=True).stdout
    assert "Pleural effusion" in dump or "Effusion" in dump
    assert "UNVERIFIED" in dump
    text = subprocess.run(["pdftotext", "-layout", str(pdf_path), "-"], capture_output=True, text=True).stdout
    assert "SYNTHETIC DEMO MODEL" in text and "Effusion" in text and "present" in text

    src = pydicom.dcmread(source, stop_before_pixels=True)
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    with engine.connect() as conn:
        findings = {f.label: f for f in conn.execute(select(FindingRow)).all()}
    assert len(findings) == 14 and findings["Effusion"].status == "present" and findings["Effusion"].region
    shown = json.loads(daemon.cli("show", str(src.SOPInstanceUID), "--json").stdout)
    latest = shown["instances"][0]["predictions"][-1]
    effusion = next(f for f in latest["findings"] if f["label"] == "Effusion")
    assert effusion["evidence"] and abs(sum(e["share"] for e in effusion["evidence"])) > 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_non_chest_image_gets_no_report_and_says_why(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(report_quiet_seconds="0.2", model_device="cpu")
    hand = write_dataset(make_dataset(body_part="HAND", rows=96, columns=96), tmp_path / "hand.dcm")
    assert daemon.storescu(str(hand)).returncode == 0
    assert list(wait_until_processed(daemon.engine(), 1).values()) == ["SKIPPED"]
    time.sleep(1.0)
    assert wait_for_reports(daemon.engine(), timeout=0) == []
    assert "HAND" in daemon.cli("show", str(pydicom.dcmread(hand).SOPInstanceUID)).stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_late_image_revises_the_study_report(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(report_quiet_seconds="0.5", model_device="cpu")
    first = _phantom(tmp_path, 0, "first.dcm")
    study = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    assert daemon.storescu(str(first)).returncode == 0
    engine = daemon.engine()
    (r1,) = wait_for_reports(engine)
    assert r1.state == "DONE"
    second = _phantom(tmp_path, 3, "second.dcm", study_uid=study)
    assert daemon.storescu(str(second)).returncode == 0
    rows = wait_for_reports(engine, n=1, state="SUPERSEDED")
    assert [(r.revision, r.state) for r in rows] == [(1, "SUPERSEDED"), (2, "DONE")]
    assert rows[1].instance_uids and len(rows[1].instance_uids) == 2
    old_sr = pydicom.dcmread(daemon.data_dir / report_files(engine, rows[0].id)["sr"][0])
    new_sr = pydicom.dcmread(daemon.data_dir / report_files(engine, rows[1].id)["sr"][0])
    predecessor = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert new_sr.SOPInstanceUID != old_sr.SOPInstanceUID
    pdf = daemon.data_dir / report_files(engine, rows[1].id)["pdf"][0]
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert "revision 2" in text.lower()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_results_are_filed_into_the_original_study_in_orthanc(
    make_daemon, tmp_path: Path, orthanc: OrthancServer
) -> None:
    pacs = orthanc
    daemon = make_daemon(
        report_quiet_seconds="0.5",
        model_device="cpu",
        model="demo",
        forward_destinations=pacs.destination,
        forward_backoff_seconds="0.5",
    )
    source = _phantom(tmp_path, 0, "effusion.dcm")
    assert daemon.storescu(str(source)).returncode == 0
    (report,) = wait_for_reports(daemon.engine())
    files = report_files(daemon.engine(), report.id)
    expected = {
        str(pydicom.dcmread(daemon.data_dir / p, stop_before_pixels=True).SOPInstanceUID)
        for kind in ("sr", "sc", "pm", "epdf")
        for p in files[kind]
    }
    study = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    deadline = time.monotonic() + 60
    while set(pacs.study_instances(study)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    filed = pacs.study_instances(study)
    assert set(filed) == expected, daemon.cli("forward", "--json").stdout
    assert "1.2.840.10008.5.1.4.1.1.88.34" in filed.values(), "the Comprehensive 3D SR is in the study"
    assert "1.2.840.10008.5.1.4.1.1.30" in filed.values(), "the heatmap Parametric Map is in the study"
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["forwards"]["totals"]["DONE"] == len(expected)


def _series_numbers(pacs: OrthancServer, study_uid: str) -> dict[str, list[tuple[str, int]]]:
    """Series Instance UID -> [(SOP Instance UID, InstanceNumber)] of every instance Orthanc holds in the study."""
    study = pacs.find_study(study_uid)
    out: dict[str, list[tuple[str, int]]] = {}
    for instance in pacs.get(f"/studies/{study}/instances") if study else []:
        tags = pacs.get(f"/instances/{instance['ID']}/simplified-tags")
        out.setdefault(tags["SeriesInstanceUID"], []).append((tags["SOPInstanceUID"], int(tags["InstanceNumber"])))
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_three_revisions_put_each_heatmap_in_the_pacs_once_with_unique_numbers(
    make_daemon, tmp_path: Path, orthanc: OrthancServer
) -> None:
    pacs = orthanc
    daemon = make_daemon(report_quiet_seconds="0.5", model_device="cpu", model="demo",
                         forward_destinations=pacs.destination, forward_backoff_seconds="0.5")
    engine = daemon.engine()
    first = _phantom(tmp_path, 0, "first.dcm")
    study = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    sources = [first, _phantom(tmp_path, 3, "second.dcm", study_uid=study),
               _phantom(tmp_path, 4, "third.dcm", study_uid=study)]
    for n, source in enumerate(sources, start=1):
        assert daemon.storescu(str(source)).returncode == 0
        rows = (wait_for_reports(engine, n=n, state="DONE") if n == 1
                else wait_for_reports(engine, n=n - 1, state="SUPERSEDED"))
    assert [(r.revision, r.state) for r in rows] == [(1, "SUPERSEDED"), (2, "SUPERSEDED"), (3, "DONE")]
    per_revision = [report_files(engine, r.id) for r in rows]
    # report folders are named by the Study Instance UID
    assert all(p.startswith(f"reports/{study}/r{r.revision}/") for r, f in zip(rows, per_revision, strict=True)
               for paths in f.values() for p in paths)

    def uid(path: str) -> str:
        return str(pydicom.dcmread(daemon.data_dir / path, stop_before_pixels=True).SOPInstanceUID)

    heatmaps = [{Path(p).name: uid(p) for kind in ("sc", "pm") for p in f.get(kind, [])} for f in per_revision]
    assert heatmaps[0] and len(heatmaps[2]) > len(heatmaps[1]) > len(heatmaps[0])
    for earlier, later in zip(heatmaps, heatmaps[1:], strict=False):
        assert all(later[name] == value for name, value in earlier.items()), "an unchanged heatmap kept its UID"
    expected = set(heatmaps[2].values()) | {uid(f[k][0]) for f in per_revision for k in ("sr", "epdf")}
    deadline = time.monotonic() + 60
    while set(pacs.study_instances(study)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(pacs.study_instances(study)) == expected, daemon.cli("forward", "--json").stdout
    series = _series_numbers(pacs, study)
    assert sum(len(v) for v in series.values()) == len(expected), "each (image, finding) heatmap once"
    for instances in series.values():
        numbers = [number for _, number in instances]
        assert len(numbers) == len(set(numbers)), f"instance numbers repeat in a series: {sorted(numbers)}"
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["forwards"]["totals"]["DONE"] == len(expected), "unchanged heatmaps were not sent again"
    # the Encapsulated PDF of a revision names the one it replaces
    epdf = pydicom.dcmread(daemon.data_dir / per_revision[2]["epdf"][0])
    ref = epdf.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == uid(per_revision[1]["epdf"][0])
    assert _errors("dciodvfy", daemon.data_dir / per_revision[2]["epdf"][0]) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_daemon_audits_its_model_at_start_and_read_only_commands_write_nothing(make_daemon) -> None:
    from sqlalchemy import func, inspect

    from daemon.store.tables import AuditEvent, ModelVersion

    daemon = make_daemon(model_device="cpu")
    engine = daemon.engine()
    with engine.connect() as conn:
        versions = conn.execute(select(ModelVersion.version, ModelVersion.state, ModelVersion.operation)).all()
        events = conn.execute(select(AuditEvent.event, AuditEvent.detail).order_by(AuditEvent.id)).all()
    assert [(state, operation) for _, state, operation in versions] == [("active", "baseline")]
    assert [e for e, _ in events] == ["model_activated", "daemon_started"] and versions[0][0] in events[1][1]
    daemon.stop()

    def snapshot() -> tuple[dict[str, int], list[tuple[str, int, int]]]:
        with engine.connect() as conn:
            counts = {t: conn.execute(select(func.count()).select_from(text_table(t))).scalar_one()
                      for t in inspect(conn).get_table_names()}
        db = Path(daemon.database_url.removeprefix("sqlite:///"))
        return counts, [(db.name, db.stat().st_mtime_ns, db.stat().st_size)]

    def text_table(name: str):  # type: ignore[no-untyped-def]
        from sqlalchemy import table

        return table(name)

    engine.dispose()
    before = snapshot()
    engine.dispose()
    listed = json.loads(daemon.cli("model", "list", "--json").stdout)
    assert [v["version"] for v in listed] == [versions[0][0]]
    daemon.cli("model", "show", "active")
    daemon.cli("status")
    daemon.cli("show", "1.2.3.4", check=False)
    assert snapshot() == before, "a read-only command wrote to the database"
