"""Report scheduling: the quiet time, revisions opened by late images, claiming with a lease (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from daemon.settings import Settings
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.spool import Spool
from daemon.store.tables import ReportState, Study, StudyReportRow, utcnow
from daemon.work.reports import ReportLoop, load_archive, mark_pending, save_archive
from model.types import LABELS, Prediction


@pytest.fixture
def loop(tmp_path: Path, head_db_url: str) -> ReportLoop:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=head_db_url)
    spool = Spool(settings.spool_dir, settings.quarantine_dir, 0)
    return ReportLoop(session_factory(engine), spool, settings)


def _study(loop: ReportLoop) -> int:
    with loop.sessions.begin() as session:
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        return study.id


def _pending(loop: ReportLoop, study_id: int, quiet: float) -> None:
    with loop.sessions.begin() as session:
        mark_pending(session, study_id, quiet_seconds=quiet, model_version="v1")


def _rows(loop: ReportLoop) -> list[tuple[int, str]]:
    with loop.sessions() as session:
        rows = session.execute(select(StudyReportRow.revision, StudyReportRow.state).order_by(StudyReportRow.revision))
        return [(r, ReportState(s).value) for r, s in rows]


def test_images_within_the_quiet_time_share_one_pending_revision(loop: ReportLoop) -> None:
    study = _study(loop)
    _pending(loop, study, 60)
    _pending(loop, study, 60)
    assert _rows(loop) == [(1, "PENDING")]
    assert loop.claim() is None, "not due before the quiet time has passed"


def test_a_late_image_while_writing_opens_the_next_revision_which_waits(loop: ReportLoop) -> None:
    study = _study(loop)
    _pending(loop, study, 0)
    first = loop.claim()
    assert first is not None and _rows(loop) == [(1, "WRITING")]
    _pending(loop, study, 0)
    assert _rows(loop) == [(1, "WRITING"), (2, "PENDING")]
    assert loop.claim() is None, "revision 2 waits while revision 1 is being written"
    with loop.sessions.begin() as session:  # the writer of revision 1 died: its lease runs out
        session.execute(update(StudyReportRow).values(due_at=utcnow() - timedelta(seconds=1)))
    assert loop.claim() == first, "an expired lease is taken again, oldest revision first"


def test_prediction_archive_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=14).astype(np.float32)
    prediction = Prediction(
        labels=LABELS,
        probabilities=(1 / (1 + np.exp(-logits))).astype(np.float32),
        logits=logits,
        cams=rng.normal(size=(14, 4, 4)).astype(np.float32),
        top_channels=np.zeros((14, 3), np.int32),
        top_contributions=np.zeros((14, 3), np.float32),
        bias=np.zeros(14, np.float32),
        model_version="abc",
    )
    path = tmp_path / "r" / "abc.npz"
    save_archive(path, prediction, {"version": "abc", "thresholds": {label: 0.5 for label in LABELS}})
    back = load_archive(path)
    assert np.array_equal(back.prediction.cams, prediction.cams) and back.prediction.labels == LABELS
    assert back.model["thresholds"]["Mass"] == 0.5 and not list(path.parent.glob("*.tmp*"))


def test_worker_processes_start_with_the_first_prediction_not_with_the_daemon(tmp_path: Path) -> None:
    """An idle daemon never starts report worker processes; the first archived prediction starts them once."""
    import multiprocessing

    from daemon.work.reports import ReportScheduler

    db_url = f"sqlite:///{tmp_path / 'chexd.db'}"
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, report_workers=1)
    loop = ReportLoop(session_factory(engine), Spool(settings.spool_dir, settings.quarantine_dir, 0), settings)
    scheduler = ReportScheduler(settings, on_prediction=loop.prepare)
    before = set(multiprocessing.active_children())
    loop.start()
    try:
        assert set(multiprocessing.active_children()) == before
        for _ in range(2):  # as the sink does for each prediction; the second call starts nothing more
            assert scheduler.on_prediction is not None
            scheduler.on_prediction()
        started = set(multiprocessing.active_children()) - before
        assert len(started) == 1
    finally:
        loop.stop()
    assert not (set(multiprocessing.active_children()) - before)


# --- revisions without PACS clutter (issue 15) ------------------------------------------------------------------------


def test_three_revisions_keep_unchanged_heatmaps_and_number_new_ones_after_the_old(tmp_path: Path) -> None:
    import datetime as dt

    import pydicom

    from reporting.compose import compose_study
    from reporting.facts import ModelFacts
    from tests.reporting_helpers import THRESHOLDS, phantom_case

    facts = ModelFacts(name="chexd-test", version="0123456789abcdef", weights_sha256="ab" * 32, synthetic=True,
                       intended_use="tests", thresholds=THRESHOLDS)
    study = "1.2.826.0.1.3680043.8.498.15"
    cases = [phantom_case(index, findings={"Effusion": 0.9, "Cardiomegaly": 0.8}, size=128, study_uid=study)[1:]
             for index in (2, 3, 4)]
    images, revisions, earlier, pdfs = [], [], [], []
    for revision, (ds, image, prediction) in enumerate(cases, start=1):
        images.append((ds, image, prediction, facts))
        composed = compose_study(images=list(images), revision=revision, predecessors=[],
                                 folder=tmp_path / f"r{revision}", top_channels=3,
                                 created_at=dt.datetime(2026, 12, revision, tzinfo=dt.UTC),
                                 pdf_predecessors=pdfs[-1:], earlier=list(earlier))
        revisions.append(composed.files)
        earlier += [f.path for f in composed.files if f.kind in ("sc", "pm")]
        pdfs.append(next(f.sop_instance_uid for f in composed.files if f.kind == "pdf-dicom"))
    sent = [[f for f in files if f.sop_instance_uid and not f.unchanged] for files in revisions]
    # each revision sends only the new image's 2 heatmaps (SC and Parametric Map) plus its SR and Encapsulated PDF
    assert [sorted(f.kind for f in s) for s in sent] == [["pdf-dicom", "pm", "pm", "sc", "sc", "sr"]] * 3
    all_sc = [f for s in sent for f in s if f.kind == "sc"]
    assert len({f.sop_instance_uid for f in all_sc}) == 6  # each (image, finding) once
    numbers = [int(pydicom.dcmread(f.path, stop_before_pixels=True).InstanceNumber) for f in all_sc]
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]
    # an unchanged heatmap is the earlier file, byte for byte (same UID, same number)
    for files in revisions[1:]:
        for f in (f for f in files if f.unchanged):
            first = next(g for g in revisions[0] + revisions[1] if g.sop_instance_uid == f.sop_instance_uid
                         and not g.unchanged)
            assert f.path.read_bytes() == first.path.read_bytes()
    assert sum(f.unchanged for f in revisions[2]) == 8  # 4 SCs, 4 Parametric Maps
    # the Encapsulated PDF of revision 3 references revision 2's
    epdf = pydicom.dcmread(next(f.path for f in revisions[2] if f.kind == "pdf-dicom"))
    item = epdf.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == study
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pdfs[1]
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(
        next(f.path for f in revisions[0] if f.kind == "pdf-dicom"))


def test_a_changed_heatmap_gets_a_new_uid_and_the_next_number(tmp_path: Path) -> None:
    import pydicom

    from reporting.compose import compose_study
    from reporting.facts import ModelFacts
    from tests.reporting_helpers import THRESHOLDS, phantom_case

    facts = ModelFacts(name="chexd-test", version="v1", weights_sha256="ab" * 32, synthetic=True, intended_use="tests",
                       thresholds=THRESHOLDS)
    _, ds, image, prediction = phantom_case(findings={"Effusion": 0.9}, size=128)
    first = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                          folder=tmp_path / "r1")
    old = [f for f in first.files if f.kind == "sc"]
    changed = Prediction(labels=prediction.labels, probabilities=prediction.probabilities, logits=prediction.logits,
                         cams=prediction.cams * 0.5, top_channels=prediction.top_channels,
                         top_contributions=prediction.top_contributions, bias=prediction.bias,
                         model_version=prediction.model_version, evidence_total=prediction.evidence_total)
    second = compose_study(images=[(ds, image, changed, facts)], revision=2, predecessors=[], folder=tmp_path / "r2",
                           earlier=[f.path for f in old])
    new = [f for f in second.files if f.kind == "sc"]
    assert len(old) == len(new) == 1 and not new[0].unchanged
    assert new[0].sop_instance_uid != old[0].sop_instance_uid
    assert pydicom.dcmread(new[0].path, stop_before_pixels=True).InstanceNumber == 2


def test_report_folders_are_named_by_study_instance_uid(tmp_path: Path) -> None:
    from daemon.work.reports import study_folder

    assert study_folder(tmp_path, "1.2.840.113619.2.55.3", 7) == tmp_path / "reports" / "1.2.840.113619.2.55.3"
    # not a UID (a hostile or broken header): the database id, never a path from the header
    for bad in ("../../etc", "1.2.3/4", "", "1..2", "01.2", "1." + "2" * 70):
        assert study_folder(tmp_path, bad, 7) == tmp_path / "reports" / "study-7"


def test_lung_fields_estimated_by_the_worker_are_archived_and_not_estimated_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference worker estimates the lung fields for its input checks; the archive carries them and the report
    reuses them: the same documents, without a second estimate (about 50 CPU-ms per image)."""
    import datetime as dt

    import reporting.report
    from daemon.work.inference import input_checks
    from reporting.compose import compose_study
    from reporting.facts import ModelFacts
    from tests.reporting_helpers import THRESHOLDS, phantom_case

    _, ds, image, prediction = phantom_case(2, findings={"Effusion": 0.9}, size=128)
    issues, fields = input_checks(image, "MONOCHROME2", min_side=64)
    assert fields is not None and fields.method == "image" and not issues
    path = tmp_path / "archive.npz"
    save_archive(path, prediction, {"version": prediction.model_version}, lung_fields=fields)
    back = load_archive(path).lung_fields
    assert back is not None and back.method == fields.method and back.image_shape == fields.image_shape
    assert np.array_equal(back.zones, fields.zones) and np.array_equal(back.left_lung, fields.left_lung)

    facts = ModelFacts(name="chexd-test", version="0123456789abcdef", weights_sha256="ab" * 32, synthetic=True,
                       intended_use="tests", thresholds=THRESHOLDS)
    when = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    estimated = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                              folder=tmp_path / "estimated", created_at=when)

    def no_second_estimate(_image: np.ndarray) -> None:
        raise AssertionError("lung fields estimated again")

    monkeypatch.setattr(reporting.report, "estimate_lung_fields", no_second_estimate)
    reused = compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=[],
                           folder=tmp_path / "reused", created_at=when, lung_fields=[back])
    assert [(f.kind, f.sop_instance_uid) for f in reused.files] == [(f.kind, f.sop_instance_uid)
                                                                    for f in estimated.files]
    assert (tmp_path / "reused" / "report.pdf").read_bytes() == (tmp_path / "estimated" / "report.pdf").read_bytes()
