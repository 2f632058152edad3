"""Study reports: from stored predictions to PDF, SR, SC and encapsulated-PDF files, rows, and forwarding.

Each job that produced a prediction archives it (``results/<sop uid>/<version>.npz``: the Prediction with its CAMs
and the model facts a report needs) and marks its study *pending*: a ``study_reports`` row that becomes due once no
new image has arrived for ``report_quiet_seconds``. The :class:`ReportLoop` then writes the study's report from every
image's newest prediction. An image arriving after a report was written makes a new revision, which supersedes the
earlier one (SR and Encapsulated PDF PredecessorDocumentsSequence, PDF marked as a revision); the superseded files stay
on disk. A revision does not clutter the PACS: a heatmap object (SC, Parametric Map) whose content did not change
(same source image, finding, model version, pixels) keeps its SOP Instance UID, is copied byte for byte from the earlier
revision and is not forwarded again; new ones get InstanceNumbers after the highest their series used
(reporting.compose). Only new or changed heatmaps and the new SR and PDF are forwarded.

Folders: ``reports/<Study Instance UID>/r<revision>/`` (:func:`study_folder`). Reports written before this naming
stay in ``reports/study-<database id>/``: nothing is moved, and every file is found through its
``report_files.path`` (relative to the data dir), which ``chexd show`` and forwarding use.

Disk: archives and documents are written only above the disk reserve (:class:`daemon.store.spool.DiskGuard`); below it,
or when a write fails because the disk is full, the report goes back to PENDING and the loop waits (one log line per
change) until space returns. Documents are composed in a staging folder and renamed into place by the daemon, so a
half-written revision is never visible.

Crash: the worker processes die with the daemon (PR_SET_PDEATHSIG on Linux, plus a lifeline pipe whose end-of-file
they watch), so none writes after a ``kill -9``. A WRITING report records its writer (``host/pid``) in ``error``;
:func:`resume_orphaned_reports` puts those of dead writers back at start-up, and another live node puts them back
once the writer's node misses its heartbeats (daemon.store.nodes.sweep).

Several nodes: the quiet timer and the revisions are rows, so images of one study processed on several nodes make
one report. :func:`mark_pending` locks the study row (PostgreSQL), so two nodes never open the same revision; a
revision is claimed by one conditional UPDATE, and published only by the writer that still owns it (the owning
UPDATE, the rename into place and the file rows are one transaction), so a revision is never written twice.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import re
import shutil
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import case, delete, func, literal, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DaemonError
from daemon.settings import Settings
from daemon.store.identity import MixedPatientsError, check_one_patient
from daemon.store.instances import audit
from daemon.store.nodes import WRITER_PREFIX
from daemon.store.spool import DiskGuard, DiskPause, Spool, fsync_dir, is_disk_full
from daemon.store.tables import (
    EvidenceRow,
    FindingRow,
    Instance,
    PredictionRow,
    ReportFile,
    ReportState,
    Series,
    Study,
    StudyReportRow,
    UTCDateTime,
    utcnow,
)
from daemon.work.lifeline import exit_if_orphaned, worker_init
from daemon.work.loop import Loop
from daemon.work.worker import HOST, ClaimedJob, JobResult, PermanentJobError, pid_alive, read_stored_image
from model.manifest import sha256_file
from model.types import Prediction
from reporting.regions import LungFields

log = logging.getLogger(__name__)

REPORT_LEASE = timedelta(minutes=5)
# WRITER_PREFIX (daemon.store.nodes) + host/pid is in study_reports.error while WRITING
DISK_WAIT_SECONDS = 1.0  # how often a paused loop looks at the free space again
_KINDS = {"pdf-dicom": "epdf"}  # report_files.kind is at most 8 characters
_PER_IMAGE_KINDS = ("sc", "pm")  # per (image, finding) objects whose UID comes from their content
_UID_FOLDER = re.compile(r"(?=.{1,64}$)(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")  # PS3.5 9.1: digits and dots


# --- prediction archive -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchivedPrediction:
    """A prediction as archived by the worker plus the facts about the model that made it."""

    prediction: Prediction
    model: dict[str, Any]  # name, version, weights_sha256, synthetic, intended_use, thresholds, calibrated_at,
    # and "domain": the applicability gate's verdict (reporting.report.DomainCheck.to_dict(); absent when it was off)
    lung_fields: LungFields | None = None  # the worker's estimate (archived when the gate ran), reused by the report


def archive_path(data_dir: Path, sop_instance_uid: str, version: str) -> Path:
    return data_dir / "results" / sop_instance_uid / f"{version}.npz"


def _model_facts(result: JobResult) -> dict[str, Any]:
    facts = _manifest_facts(result)
    if result.domain is not None:
        facts["domain"] = result.domain.to_dict()
    return facts


def _manifest_facts(result: JobResult) -> dict[str, Any]:
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


def save_archive(path: Path, prediction: Prediction, model: dict[str, Any], *, guard: DiskGuard | None = None,
                 lung_fields: LungFields | None = None) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half archive. ``lung_fields``: archived beside
    the prediction (arrays ``lung_*``) so the report does not estimate them again.

    With ``guard``, raises DiskReserveError before writing when the archive (at most its uncompressed size) would take
    the disk below the reserve; any failure (e.g. ENOSPC) removes the temp file and leaves no archive."""
    if guard is not None:
        guard.check(path.parent, prediction.cams.size * 4 + prediction.probabilities.nbytes * 4 + 65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    try:
        np.savez_compressed(
            tmp,
            labels=np.array(prediction.labels),
            probabilities=prediction.probabilities,
            logits=prediction.logits,
            cams=prediction.cams.astype(np.float32),
            top_channels=prediction.top_channels,
            top_contributions=prediction.top_contributions,
            bias=prediction.bias,
            **({} if prediction.evidence_total is None else {"evidence_total": prediction.evidence_total}),
            model=np.array(json.dumps(model)),
            **({} if lung_fields is None else {f"lung_{k}": v for k, v in lung_fields.to_arrays().items()}),
        )
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
            evidence_total=data["evidence_total"] if "evidence_total" in data.files else None,
        )
        lung = {k.removeprefix("lung_"): data[k] for k in data.files if k.startswith("lung_")}
    fields = LungFields.from_arrays(lung) if lung else None
    return ArchivedPrediction(prediction=prediction, model=model, lung_fields=fields)


# --- scheduling -----------------------------------------------------------------------------------------------------


def mark_pending(session: Session, study_id: int, *, quiet_seconds: float, model_version: str | None) -> None:
    """Make the study's report due ``quiet_seconds`` from now: extend its PENDING revision, or open the next one.

    The study row is locked first (PostgreSQL; SQLite runs one writer at a time), so workers on several nodes never
    open the same revision twice; the extension is one conditional UPDATE, so a revision a report writer has just
    claimed (WRITING) is left alone and the image opens the next revision instead."""
    due = utcnow() + timedelta(seconds=quiet_seconds)
    session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
    extended = session.execute(
        update(StudyReportRow)
        .where(StudyReportRow.study_id == study_id, StudyReportRow.state == ReportState.PENDING)
        .values(
            due_at=case((StudyReportRow.due_at < due, literal(due, UTCDateTime())), else_=StudyReportRow.due_at),
            model_version=model_version,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if extended:
        return
    last = session.scalar(select(func.max(StudyReportRow.revision)).where(StudyReportRow.study_id == study_id)) or 0
    session.add(
        StudyReportRow(
            study_id=study_id, revision=last + 1, state=ReportState.PENDING, due_at=due, model_version=model_version
        )
    )


class ReportScheduler:
    """The worker's result sink: archives each prediction and marks its study pending (same commit as the job)."""

    def __init__(self, settings: Settings, *, on_prediction: Any = None, guard: DiskGuard | None = None) -> None:
        self.settings = settings
        self.on_prediction = on_prediction  # e.g. ReportLoop.prepare
        self.guard = guard or DiskGuard(settings.disk_reserve_mb * 2**20)

    def save(self, job: ClaimedJob, result: JobResult) -> None:
        assert result.prediction is not None
        if self.on_prediction is not None:
            self.on_prediction()
        save_archive(
            archive_path(self.settings.data_dir, job.sop_instance_uid, result.prediction.model_version),
            result.prediction,
            _model_facts(result),
            guard=self.guard,
            lung_fields=result.lung_fields,
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
            region=finding.region,  # "left lower zone (34% of heat)" / "outside the lung fields (58% of heat)"
            regions=regions or None,
            evidence=[
                EvidenceRow(
                    rank=i + 1, channel=int(e.channel), contribution=float(e.contribution), share=float(e.share)
                )
                for i, e in enumerate(finding.evidence)
            ],
        )
        session.add(row)


# --- report worker processes -----------------------------------------------------------------------------------

def warm_up() -> int:
    """Import the document libraries (highdicom, reportlab, pydicom's SR dictionaries: seconds in a fresh process) so
    the first report a worker process writes is not slowed by them. Returns the process id."""
    import reporting.compose  # noqa: F401

    return os.getpid()


def compose_files(
    *,
    images: list[tuple[Path, Path]],
    revision: int,
    predecessors: list[str],
    folder: Path,
    settings: Any,
    pdf_predecessors: list[str] | None = None,
    earlier: list[Path] | None = None,
    superseded: tuple[int, Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Read each (stored image file, prediction archive) pair and write the study's documents into ``folder`` (a
    staging folder; runs in a report worker process: decoding and the documents are CPU work). Returns the findings
    per image and the files written. ``pdf_predecessors`` and ``earlier``: see :func:`reporting.compose.compose_study`
    (the Encapsulated PDFs this revision replaces; the heatmap files of earlier revisions, reused when unchanged).

    Raises PermanentJobError when a stored image cannot be read or decoded, OSError(ENOSPC) when the disk filled up
    (``folder`` is then removed). A worker process whose daemon is gone exits without writing."""
    from reporting.compose import compose_study
    from reporting.facts import ModelFacts

    exit_if_orphaned()
    try:
        inputs, fields = [], []
        for image_path, archive_file in images:
            ds, pixels = read_stored_image(image_path)
            archived = load_archive(archive_file)
            inputs.append((ds, pixels, archived.prediction, ModelFacts.from_dict(archived.model)))
            fields.append(archived.lung_fields)
        # last line of defence (the store never merges two patients): one report, one patient, one study
        check_one_patient([(str(ds.get("SOPInstanceUID", "")), ds) for ds, *_ in inputs])
        composed = compose_study(
            images=inputs,
            lung_fields=fields,
            revision=revision,
            predecessors=predecessors,
            folder=folder,
            top_channels=settings.report_top_channels,
            exclusion_margin=settings.exclusion_margin,
            pdf_predecessors=pdf_predecessors or (),
            earlier=earlier or (),
            superseded=superseded,
        )
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if is_disk_full(exc):  # say so in a form that survives the trip back to the daemon
            raise OSError(errno.ENOSPC, f"disk full while writing the report: {type(exc).__name__}: {exc}") from None
        raise
    exit_if_orphaned()
    return composed.findings, composed.files


def study_folder(data_dir: Path, study_instance_uid: str, study_id: int) -> Path:
    """Where a study's report revisions are written: ``reports/<Study Instance UID>/`` (a person finds a study by
    its UID); ``reports/study-<database id>/`` only for a Study Instance UID that is not a safe folder name (not a
    valid DICOM UID). Folders written before this naming (``study-<id>``) stay where they are and stay readable: each
    file's path is stored in ``report_files.path``."""
    if _UID_FOLDER.fullmatch(study_instance_uid or ""):
        return data_dir / "reports" / study_instance_uid
    return data_dir / "reports" / f"study-{study_id}"


def staging_folder(folder: Path) -> Path:
    """Where a revision's documents are composed before :func:`publish` renames them to ``folder``."""
    return folder.parent / f".{folder.name}.{os.getpid()}.part"


def publish(staging: Path, folder: Path, files: list[Any]) -> list[Any]:
    """Rename the composed ``staging`` folder to ``folder`` (replacing what an interrupted earlier attempt left there)
    and fsync; return ``files`` with their paths in ``folder``."""
    from dataclasses import replace

    if folder.exists():
        shutil.rmtree(folder)
    os.rename(staging, folder)
    fsync_dir(folder.parent)
    return [replace(f, path=folder / Path(f.path).relative_to(staging)) for f in files]


def _younger(path: Path, seconds: float) -> bool:
    try:
        return seconds > 0 and time.time() - path.stat().st_mtime <= seconds
    except OSError:
        return True


def remove_stale_staging(data_dir: Path, *, min_age: float = 0.0) -> int:
    """Delete staging folders of report writers that are gone (a crash mid-report) and archive temp files; return
    how many. With ``min_age`` > 0 (other nodes share the data dir: a pid says nothing about another host's process),
    only those older than that many seconds."""
    count = 0
    for path in (data_dir / "reports").glob("*/.r*.part"):
        pid = path.name.removesuffix(".part").rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)) or _younger(path, min_age):
            continue
        shutil.rmtree(path, ignore_errors=True)
        count += 1
    for path in (data_dir / "results").glob("*/*.tmp.npz"):
        if _younger(path, min_age):
            continue
        path.unlink(missing_ok=True)
        count += 1
    return count


def resume_orphaned_reports(sessions: sessionmaker[Session]) -> int:
    """At start-up: put reports left WRITING by a dead process back to PENDING, due now (instead of waiting out
    :data:`REPORT_LEASE`). A writer is dead when it was a process of this host that no longer runs (or had this
    process's pid: a reused pid), or, on SQLite (one node), when it recorded no writer. Returns how many."""
    now = utcnow()
    with sessions.begin() as session:
        single_node = session.get_bind().dialect.name == "sqlite"
        rows = session.execute(
            select(StudyReportRow.id, StudyReportRow.error).where(StudyReportRow.state == ReportState.WRITING)
        ).all()
        orphaned = []
        for report_id, note in rows:
            writer = (note or "").removeprefix(WRITER_PREFIX) if (note or "").startswith(WRITER_PREFIX) else None
            if writer is None:
                if single_node:
                    orphaned.append(report_id)
                continue
            host, _, pid = writer.partition("/")
            if host == HOST and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
                orphaned.append(report_id)
        if orphaned:
            session.execute(
                update(StudyReportRow)
                .where(StudyReportRow.id.in_(orphaned), StudyReportRow.state == ReportState.WRITING)
                .values(state=ReportState.PENDING, due_at=now, error=None)
            )
    if orphaned:
        log.warning("resumed %d report(s) left WRITING by a process that is gone", len(orphaned))
    return len(orphaned)


class ReportLeaseLostError(DaemonError):
    """The revision being written is no longer this writer's (its node was declared dead and another took it over):
    nothing is published, nothing recorded."""


def _log_failure(future: Any) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.error("report worker process failed to start: %s", error)


class ReportLoop(Loop):
    """Background threads that write due study reports and hand DICOM results to forwarding.

    With ``report_workers`` > 0 there are that many threads, each claiming one report at a time; the documents are
    built in a pool of as many worker processes (building a PDF and an SR is pure-Python CPU work, which threads
    cannot spread over cores). Database reads and writes stay in the threads. The worker processes are started by
    one thread (``chexd-report-pool``) that lives until they are shut down, and die with the daemon (see
    :func:`daemon.work.lifeline.worker_init`). Below the disk reserve the loop waits (reports stay PENDING)."""

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
        self.guard = spool.guard
        super().__init__("chexd-reports", threads=settings.report_workers,
                         disk=DiskPause(self.guard, settings.data_dir, "reports"))
        self.writer = f"{HOST}/{os.getpid()}"
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._pool_thread: threading.Thread | None = None
        self._pool_ready = threading.Event()  # set while self._pool may take work
        self._pool_event = threading.Event()  # wakes the pool thread: stop, or a broken pool to replace
        self._lifeline: Any = None  # the daemon's (write) end of the current pool's lifeline pipe

    # --- the worker processes ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Start the worker processes and load their libraries (seconds of CPU each), once: called when the first
        prediction of this run is archived, so a study's report is not delayed by it and an idle daemon never pays."""
        with self._pool_lock:
            if self.settings.report_workers <= 0 or self._pool_thread is not None or self._stop.is_set():
                return
            self._pool_thread = threading.Thread(target=self._run_pool, name="chexd-report-pool", daemon=True)
            self._pool_thread.start()
        self._pool_ready.wait(10.0)  # the processes are started (milliseconds); their imports continue in them

    def _run_pool(self) -> None:
        """Own the worker processes: start a pool, keep it until stop (or until it breaks: then start another)."""
        workers = self.settings.report_workers
        while not self._stop.is_set():
            reader, writer = multiprocessing.Pipe(duplex=False)
            # spawn: forking a process that holds torch, CUDA and open database connections is unsafe
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=worker_init,
                initargs=(os.getpid(), reader, self.settings.log_level),
            )
            # Each submit starts one process from this thread (none is idle yet), so PR_SET_PDEATHSIG follows this
            # thread, which ends only after the pool is shut down.
            for future in [pool.submit(warm_up) for _ in range(workers)]:
                future.add_done_callback(_log_failure)
            with self._pool_lock:
                self._pool, self._lifeline = pool, writer
                self._pool_ready.set()
            self._pool_event.wait()
            self._pool_event.clear()
            pool.shutdown(wait=True, cancel_futures=True)  # at stop, stop() cuts the lifeline if this takes too long
            with self._pool_lock:
                self._pool_ready.clear()
                self._pool, self._lifeline = None, None
            writer.close()
            reader.close()

    def _take_pool(self) -> ProcessPoolExecutor | None:
        """The pool to compose in (waiting for it to start), or None when documents are built in this thread."""
        if self.settings.report_workers <= 0:
            return None
        self.prepare()
        while not self._pool_ready.wait(0.5):
            if self._stop.is_set():
                raise CancelledError("stopping")
        with self._pool_lock:
            if self._pool is None:
                raise CancelledError("stopping")
            return self._pool

    def _renew_pool(self, broken: ProcessPoolExecutor) -> None:
        with self._pool_lock:
            if self._pool is broken and self._pool_ready.is_set():
                self._pool_ready.clear()
                self._pool_event.set()

    # --- the loop -----------------------------------------------------------------------------------------------------

    paused_wait = DISK_WAIT_SECONDS
    error_wait = 0.0

    def thread_name(self, index: int) -> str:
        return f"chexd-reports-{index}"

    def poll_seconds(self) -> float:
        return min(1.0, max(0.1, self.settings.report_quiet_seconds / 4))

    def step(self, index: int) -> bool:
        return self.run_one()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop within about ``timeout`` seconds: a report being written may finish in the first half; after that the
        worker processes are ended (their lifeline cut) and an unfinished report goes back to PENDING."""
        deadline = time.monotonic() + timeout
        self.signal_stop()
        self.join(deadline - timeout / 2)
        with self._pool_lock:
            self._pool_event.set()
            lifeline = self._lifeline if self.alive() else None
        if lifeline is not None:
            log.warning("report still being written at shutdown: ending the report worker processes")
            lifeline.close()  # every worker process sees end-of-file and exits
        ended = self.join(deadline, minimum=0.1)
        if self._pool_thread is not None:
            self._pool_thread.join(max(0.1, deadline - time.monotonic()))
        return ended

    def claim(self) -> int | None:
        """Take the next due report: PENDING past its quiet time, or WRITING past its lease (its writer died). It
        becomes WRITING with a lease and this process as its writer (in ``error``). A study with a revision being
        written waits, so revisions finish in order."""
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
                .values(state=ReportState.WRITING, due_at=now + REPORT_LEASE, error=WRITER_PREFIX + self.writer)
            ).rowcount
        return row.id if taken else None

    def release(self, report_id: int, note: str | None = None) -> None:
        """Put a report this process was writing back to PENDING, due now (nothing of it was published)."""
        with self.sessions.begin() as session:
            session.execute(
                update(StudyReportRow)
                .where(StudyReportRow.id == report_id, StudyReportRow.state == ReportState.WRITING)
                .values(state=ReportState.PENDING, due_at=utcnow(), error=note)
            )

    def run_one(self) -> bool:
        report_id = self.claim()
        if report_id is None:
            return False
        try:
            self.write(report_id)
        except ReportLeaseLostError as exc:
            log.warning("report %d: %s", report_id, exc)
            return True
        except Exception as exc:
            if is_disk_full(exc):
                self.release(report_id, "waiting for disk space")
                self.disk.hit(exc)
                return True
            if self._stop.is_set():  # the pool was shut down or its processes ended under this report
                self.release(report_id)
                log.warning("report %d interrupted by shutdown; it is written at the next start", report_id)
                return True
            if isinstance(exc, MixedPatientsError):
                log.error("report %d failed: %s", report_id, exc)
                audit(self.sessions, "report_failed_identity", detail=f"report {report_id}: {exc}")
            elif isinstance(exc, BrokenProcessPool):
                log.error("report %d failed: a report worker process died (%s); starting new ones", report_id, exc)
            else:
                log.exception("report %d failed", report_id)
            with self.sessions.begin() as session:
                session.execute(
                    update(StudyReportRow)
                    .where(self._owned(report_id))
                    .values(state=ReportState.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
                )
        return True

    def _owned(self, report_id: int) -> Any:
        """The revision is still WRITING by this process (not taken over by another node)."""
        return (
            (StudyReportRow.id == report_id)
            & (StudyReportRow.state == ReportState.WRITING)
            & (StudyReportRow.error == WRITER_PREFIX + self.writer)
        )

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
            pdf_predecessors = [f.sop_instance_uid for f in previous.files if f.kind == "epdf"] if previous else []
            # the PDF says "supersedes revision N of <date>"
            superseded = (previous.revision, previous.finished_at or previous.created_at) if previous else None
            # every heatmap object an earlier revision wrote (hence sent): reused when unchanged, numbers kept unique
            earlier = [
                self.settings.data_dir / path
                for path in session.scalars(
                    select(ReportFile.path)
                    .join(StudyReportRow, ReportFile.report_id == StudyReportRow.id)
                    .where(
                        StudyReportRow.study_id == study_id,
                        StudyReportRow.revision < revision,
                        StudyReportRow.state.in_([ReportState.DONE, ReportState.SUPERSEDED]),
                        ReportFile.kind.in_(_PER_IMAGE_KINDS),
                    )
                    .order_by(StudyReportRow.revision, ReportFile.id)
                )
            ]
            study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id)) or ""
            images = study_images(session, self.spool, self.settings.data_dir, study_id)
        if not images:
            raise PermanentJobError("no image of the study has a usable prediction")
        folder = study_folder(self.settings.data_dir, study_uid, study_id) / f"r{revision}"
        # The documents (PDF, SR, heatmap SCs) take about as much as the images they show: a rough upper bound.
        estimate = 2**20 + sum(image.path.stat().st_size for image in images if image.path.exists())
        self.guard.check(folder.parent, estimate)
        staging = staging_folder(folder)
        work = {
            "images": [(image.path, image.archive_path) for image in images],
            "revision": revision,
            "predecessors": predecessors,
            "folder": staging,
            "settings": self.settings,
            "pdf_predecessors": pdf_predecessors,
            "earlier": earlier,
            "superseded": superseded,
        }
        try:
            pool = self._take_pool()
            if pool is None:
                findings_per_image, files = compose_files(**work)
            else:
                try:
                    findings_per_image, files = pool.submit(compose_files, **work).result()
                except BrokenProcessPool:
                    self._renew_pool(pool)
                    raise
            self._record(report_id, study_id, revision, images, findings_per_image, staging, folder, files)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("report written study_id=%d revision=%d images=%d", study_id, revision, len(images))
        if self.on_written is not None:
            self.on_written()

    def _record(
        self,
        report_id: int,
        study_id: int,
        revision: int,
        images: list[StudyImage],
        findings_per_image: list[Any],
        staging: Path,
        folder: Path,
        files: list[Any],
    ) -> None:
        """One transaction: lock the study (revisions of one study are recorded one at a time, so exactly one ends
        DONE), take the revision's row (still ours, else ReportLeaseLostError), rename the documents into place,
        record findings and files, enqueue forwards, supersede the previous revision. The row stays locked from the
        first UPDATE to the commit, so a node taking this writer's work over waits for it (PostgreSQL)."""
        with self.sessions.begin() as session:
            session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
            owned = session.execute(
                update(StudyReportRow)
                .where(self._owned(report_id))
                .values(finished_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount
            if not owned:
                raise ReportLeaseLostError(
                    "lost the revision before publishing it (another node took it over); nothing written"
                )
            files = publish(staging, folder, files)
            for image, findings in zip(images, findings_per_image, strict=True):
                store_findings(session, image.prediction_id, findings)
            file_ids = []
            for written in files:
                row = ReportFile(
                    report_id=report_id,
                    kind=_KINDS.get(written.kind, written.kind),
                    path=str(written.path.relative_to(self.settings.data_dir)),
                    sha256=sha256_file(written.path),
                    sop_instance_uid=written.sop_instance_uid,
                    sop_class_uid=written.sop_class_uid,
                )
                session.add(row)
                session.flush()
                if written.sop_instance_uid and not getattr(written, "unchanged", False):
                    file_ids.append(row.id)  # an unchanged heatmap was sent with an earlier revision: not again
            if self.settings.forward_destinations and file_ids:
                from daemon.work.forward import enqueue

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
