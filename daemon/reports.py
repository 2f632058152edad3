"""Study reports: from stored predictions to PDF, SR, SC and encapsulated-PDF files, rows, and forwarding.

Each job that produced a prediction archives it (``results/<sop uid>/<version>.npz``: the Prediction with its CAMs
and the model facts a report needs) and marks its study *pending*: a ``study_reports`` row that becomes due once no
new image has arrived for ``report_quiet_seconds``. The :class:`ReportLoop` then writes the study's report from every
image's newest prediction. An image arriving after a report was written makes a new revision, which supersedes the
earlier one (SR PredecessorDocumentsSequence, PDF marked as a revision); the superseded files stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.spool import Spool
from daemon.tables import (
    EvidenceRow,
    FindingRow,
    Instance,
    PredictionRow,
    ReportFile,
    ReportState,
    Series,
    StudyReportRow,
    utcnow,
)
from daemon.worker import ClaimedJob, JobResult, PermanentJobError, read_stored_image
from model.types import Prediction

log = logging.getLogger(__name__)

REPORT_LEASE = timedelta(minutes=5)
_KINDS = {"pdf-dicom": "epdf"}  # report_files.kind is at most 8 characters


# --- prediction archive -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchivedPrediction:
    """A prediction as archived by the worker plus the facts about the model that made it."""

    prediction: Prediction
    model: dict[str, Any]  # name, version, weights_sha256, synthetic, intended_use, thresholds, calibrated_at


def archive_path(data_dir: Path, sop_instance_uid: str, version: str) -> Path:
    return data_dir / "results" / sop_instance_uid / f"{version}.npz"


def _model_facts(result: JobResult) -> dict[str, Any]:
    manifest = result.manifest
    prediction = result.prediction
    assert prediction is not None
    if manifest is None:
        return {
            "name": result.model_name or "unnamed",
            "version": prediction.model_version,
            "weights_sha256": "",
            "synthetic": result.synthetic_model,
            "intended_use": "",
            "thresholds": {label: 0.5 for label in prediction.labels},
            "calibrated_at": None,
        }
    calibrated = [p for p in manifest.provenance if p.get("operation") == "calibrate"]
    return {
        "name": manifest.name,
        "version": manifest.version_id,
        "weights_sha256": manifest.weights_sha256,
        "synthetic": manifest.synthetic,
        "intended_use": manifest.intended_use,
        "thresholds": dict(manifest.thresholds),
        "calibrated_at": calibrated[-1].get("created_at") if calibrated else None,
        "preprocessing": manifest.preprocessing.to_dict(),
    }


def save_archive(path: Path, prediction: Prediction, model: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half archive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        labels=np.array(prediction.labels),
        probabilities=prediction.probabilities,
        logits=prediction.logits,
        cams=prediction.cams.astype(np.float32),
        top_channels=prediction.top_channels,
        top_contributions=prediction.top_contributions,
        bias=prediction.bias,
        model=np.array(json.dumps(model)),
    )
    tmp.replace(path)


def load_archive(path: Path) -> ArchivedPrediction:
    """Raises FileNotFoundError when the worker never archived this prediction."""
    with np.load(path, allow_pickle=False) as data:
        model = json.loads(str(data["model"]))
        prediction = Prediction(
            labels=tuple(str(label) for label in data["labels"]),
            probabilities=data["probabilities"],
            logits=data["logits"],
            cams=data["cams"],
            top_channels=data["top_channels"],
            top_contributions=data["top_contributions"],
            bias=data["bias"],
            model_version=model["version"],
        )
    return ArchivedPrediction(prediction=prediction, model=model)


# --- scheduling -----------------------------------------------------------------------------------------------------


def mark_pending(session: Session, study_id: int, *, quiet_seconds: float, model_version: str | None) -> None:
    """Make the study's report due ``quiet_seconds`` from now: extend its PENDING revision, or open the next one."""
    due = utcnow() + timedelta(seconds=quiet_seconds)
    pending = session.scalar(
        select(StudyReportRow).where(StudyReportRow.study_id == study_id, StudyReportRow.state == ReportState.PENDING)
    )
    if pending is not None:
        pending.due_at = max(pending.due_at, due)
        pending.model_version = model_version
        return
    last = session.scalar(select(func.max(StudyReportRow.revision)).where(StudyReportRow.study_id == study_id)) or 0
    session.add(
        StudyReportRow(
            study_id=study_id, revision=last + 1, state=ReportState.PENDING, due_at=due, model_version=model_version
        )
    )


class ReportScheduler:
    """The worker's result sink: archives each prediction and marks its study pending (same commit as the job)."""

    def __init__(self, settings: Settings, *, on_prediction: Any = None) -> None:
        self.settings = settings
        self.on_prediction = on_prediction  # e.g. ReportLoop.prepare

    def save(self, job: ClaimedJob, result: JobResult) -> None:
        assert result.prediction is not None
        if self.on_prediction is not None:
            self.on_prediction()
        save_archive(
            archive_path(self.settings.data_dir, job.sop_instance_uid, result.prediction.model_version),
            result.prediction,
            _model_facts(result),
        )

    def record(self, session: Session, job: ClaimedJob, result: JobResult) -> None:
        study_id = session.scalar(
            select(Series.study_id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.id == job.instance_id)
        )
        if study_id is not None:
            mark_pending(
                session,
                study_id,
                quiet_seconds=self.settings.report_quiet_seconds,
                model_version=result.prediction.model_version if result.prediction else None,
            )


# --- writing --------------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class StudyImage:
    """One image of a study to report: its stored file, instance row id, prediction row id, the model version of that
    prediction and its archive file (prediction, CAMs and model facts; see :func:`save_archive`)."""

    instance_id: int
    prediction_id: int
    sop_instance_uid: str
    path: Path
    model_version: str
    archive_path: Path


def study_images(session: Session, spool: Spool, data_dir: Path, study_id: int) -> list[StudyImage]:
    """Every image of the study with an archived prediction: the newest prediction per image, oldest image first."""
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.path, PredictionRow.id, PredictionRow.model_version)
        .join(Series, Instance.series_id == Series.id)
        .join(PredictionRow, PredictionRow.instance_id == Instance.id)
        .where(Series.study_id == study_id)
        .order_by(Instance.received_at, Instance.id, PredictionRow.created_at)
    ).all()
    newest: dict[int, Any] = {}
    for row in rows:
        newest[row[0]] = row  # later predictions overwrite earlier ones
    images = []
    for instance_id, uid, rel_path, prediction_id, version in newest.values():
        archive = archive_path(data_dir, uid, version)
        if not archive.is_file():
            log.warning("no archived prediction for sop_instance_uid=%s version %s; left out", uid, version)
            continue
        images.append(
            StudyImage(
                instance_id=instance_id,
                prediction_id=prediction_id,
                sop_instance_uid=uid,
                path=spool.path_of(rel_path),
                model_version=version,
                archive_path=archive,
            )
        )
    return images


def store_findings(session: Session, prediction_id: int, findings: list[Any]) -> None:
    """Replace the findings (and their evidence) of one prediction with the report's."""
    session.execute(delete(FindingRow).where(FindingRow.prediction_id == prediction_id))
    session.flush()
    for finding in findings:
        regions = {r.zone: float(r.share) for r in finding.regions}
        row = FindingRow(
            prediction_id=prediction_id,
            label=finding.label,
            probability=float(finding.probability),
            threshold=float(finding.threshold),
            status=finding.status,
            reason=finding.reason,
            region=max(regions, key=regions.__getitem__) if regions else None,
            regions=regions or None,
            evidence=[
                EvidenceRow(
                    rank=i + 1, channel=int(e.channel), contribution=float(e.contribution), share=float(e.share)
                )
                for i, e in enumerate(finding.evidence)
            ],
        )
        session.add(row)


def warm_up() -> int:
    """Import the document libraries (highdicom, reportlab, pydicom's SR dictionaries: seconds in a fresh process) so
    the first report a worker process writes is not slowed by them. Returns the process id."""
    import reporting.compose  # noqa: F401

    return os.getpid()


def compose_files(
    *, images: list[tuple[Path, Path]], revision: int, predecessors: list[str], folder: Path, settings: Any
) -> tuple[list[Any], list[Any]]:
    """Read each (stored image file, prediction archive) pair and write the study's documents (runs in a report worker
    process: decoding and the documents are CPU work). Returns the findings per image and the files written.

    Raises PermanentJobError when a stored image cannot be read or decoded."""
    from reporting.compose import compose_study

    inputs = []
    for image_path, archive_file in images:
        ds, pixels = read_stored_image(image_path)
        archived = load_archive(archive_file)
        inputs.append((ds, pixels, archived.prediction, archived.model))
    composed = compose_study(
        images=inputs, revision=revision, predecessors=predecessors, folder=folder, settings=settings
    )
    return composed.findings, composed.files


def _log_failure(future: Any) -> None:
    error = future.exception()
    if error is not None:
        log.error("report worker process failed to start: %s", error)


class ReportLoop:
    """Background threads that write due study reports and hand DICOM results to forwarding.

    With ``report_workers`` > 0 there are that many threads, each claiming one report at a time; the documents are
    built in a pool of as many worker processes (building a PDF and an SR is pure-Python CPU work, which threads
    cannot spread over cores). Database reads and writes stay in the threads."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool: Spool,
        settings: Settings,
        *,
        on_written: Any = None,
    ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.settings = settings
        self.on_written = on_written
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def prepare(self) -> None:
        """Start the worker processes and load their libraries (seconds of CPU each), once: called when the first
        prediction of this run is archived, so a study's report is not delayed by it and an idle daemon never pays."""
        workers = self.settings.report_workers
        with self._pool_lock:
            if workers <= 0 or self._pool is not None or self._stop.is_set():
                return
            # spawn: forking a process that holds torch, CUDA and open database connections is unsafe
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            for future in [self._pool.submit(warm_up) for _ in range(workers)]:
                future.add_done_callback(_log_failure)

    def start(self) -> None:
        workers = self.settings.report_workers
        for i in range(max(1, workers)):
            thread = threading.Thread(target=self._loop, name=f"chexd-reports-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_one():
                    continue
            except Exception:
                log.exception("report loop error; retrying shortly")
            wait = min(1.0, max(0.1, self.settings.report_quiet_seconds / 4))
            self._wake.wait(wait)
            self._wake.clear()

    def claim(self) -> int | None:
        """Take the next due report: PENDING past its quiet time, or WRITING past its lease (its writer died). It
        becomes WRITING with a lease. A study with a revision being written waits, so revisions finish in order."""
        now = utcnow()
        with self.sessions.begin() as session:
            busy = select(StudyReportRow.study_id).where(
                StudyReportRow.state == ReportState.WRITING, StudyReportRow.due_at > now
            )
            row = session.execute(
                select(StudyReportRow.id, StudyReportRow.due_at, StudyReportRow.state)
                .where(
                    StudyReportRow.state.in_([ReportState.PENDING, ReportState.WRITING]),
                    StudyReportRow.due_at <= now,
                    StudyReportRow.study_id.not_in(busy),
                )
                .order_by(StudyReportRow.due_at, StudyReportRow.revision)
                .limit(1)
            ).first()
            if row is None:
                return None
            taken = session.execute(
                update(StudyReportRow)
                .where(
                    StudyReportRow.id == row.id,
                    StudyReportRow.due_at == row.due_at,
                    StudyReportRow.state == row.state,
                )
                .values(state=ReportState.WRITING, due_at=now + REPORT_LEASE)
            ).rowcount
        return row.id if taken else None

    def run_one(self) -> bool:
        report_id = self.claim()
        if report_id is None:
            return False
        try:
            self.write(report_id)
        except Exception as exc:
            log.exception("report %d failed", report_id)
            with self.sessions.begin() as session:
                session.execute(
                    update(StudyReportRow)
                    .where(StudyReportRow.id == report_id)
                    .values(state=ReportState.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
                )
        return True

    def write(self, report_id: int) -> None:
        """Write one study report revision: documents, finding rows, file rows, then supersede the previous one."""
        with self.sessions() as session:
            report = session.get(StudyReportRow, report_id)
            assert report is not None
            study_id, revision = report.study_id, report.revision
            previous = session.scalar(
                select(StudyReportRow)
                .where(StudyReportRow.study_id == study_id, StudyReportRow.state == ReportState.DONE)
                .order_by(StudyReportRow.revision.desc())
                .limit(1)
            )
            predecessors = [f.sop_instance_uid for f in previous.files if f.kind == "sr"] if previous else []
            images = study_images(session, self.spool, self.settings.data_dir, study_id)
        if not images:
            raise PermanentJobError("no image of the study has a usable prediction")
        folder = self.settings.data_dir / "reports" / f"study-{study_id}" / f"r{revision}"
        work = {
            "images": [(image.path, image.archive_path) for image in images],
            "revision": revision,
            "predecessors": predecessors,
            "folder": folder,
            "settings": self.settings,
        }
        self.prepare()
        if self._pool is None:
            findings_per_image, files = compose_files(**work)
        else:
            findings_per_image, files = self._pool.submit(compose_files, **work).result()
        with self.sessions.begin() as session:
            for image, findings in zip(images, findings_per_image, strict=True):
                store_findings(session, image.prediction_id, findings)
            file_ids = []
            for written in files:
                row = ReportFile(
                    report_id=report_id,
                    kind=_KINDS.get(written.kind, written.kind),
                    path=str(written.path.relative_to(self.settings.data_dir)),
                    sha256=sha256_of(written.path),
                    sop_instance_uid=written.sop_instance_uid,
                    sop_class_uid=written.sop_class_uid,
                )
                session.add(row)
                session.flush()
                if written.sop_instance_uid:
                    file_ids.append(row.id)
            if self.settings.forward_destinations and file_ids:
                from daemon.forward import enqueue

                for file_id in file_ids:
                    enqueue(session, file_id, self.settings.forward_destinations)
            session.execute(
                update(StudyReportRow)
                .where(
                    StudyReportRow.study_id == study_id,
                    StudyReportRow.state == ReportState.DONE,
                    StudyReportRow.revision < revision,
                )
                .values(state=ReportState.SUPERSEDED)
            )
            newer = session.scalar(
                select(func.count()).where(
                    StudyReportRow.study_id == study_id,
                    StudyReportRow.state == ReportState.DONE,
                    StudyReportRow.revision > revision,
                )
            )
            session.execute(
                update(StudyReportRow)
                .where(StudyReportRow.id == report_id)
                .values(
                    state=ReportState.SUPERSEDED if newer else ReportState.DONE,
                    finished_at=utcnow(),
                    model_version=images[-1].model_version,
                    instance_uids=[image.sop_instance_uid for image in images],
                    error=None,
                )
            )
        log.info("report written study_id=%d revision=%d images=%d", study_id, revision, len(images))
        if self.on_written is not None:
            self.on_written()
