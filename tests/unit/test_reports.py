"""Report scheduling: the quiet time, revisions opened by late images, claiming with a lease (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from daemon.db import create_db_engine, session_factory, upgrade_to_head
from daemon.reports import ReportLoop, load_archive, mark_pending, save_archive
from daemon.settings import Settings
from daemon.spool import Spool
from daemon.tables import ReportState, Study, StudyReportRow, utcnow
from model.types import LABELS, Prediction


@pytest.fixture
def loop(tmp_path: Path, db_url: str) -> ReportLoop:
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
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

    from daemon.reports import ReportScheduler

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
