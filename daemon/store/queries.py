"""Read-side views of the database for the CLI (plain JSON-able dicts) and the reprocess command."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DaemonError
from daemon.store.instances import audit
from daemon.store.nodes import list_nodes
from daemon.store.tables import (
    IdentityConflict,
    Instance,
    Job,
    JobState,
    PredictionRow,
    ReportState,
    Series,
    Study,
    StudyReportRow,
    utcnow,
)
from daemon.work.forward import forward_summary


class NotFoundError(DaemonError, LookupError):
    """No study, series or instance has the given UID."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def queue_summary(
    sessions: sessionmaker[Session],
    *,
    last_errors: int = 10,
    forward_destinations: Sequence[str] = (),
    node_timeout_s: float = 20.0,
) -> dict[str, Any]:
    """Jobs by state, the most recent errors (failed jobs, and queued ones waiting to retry), totals, forwarding by
    destination with its dead letters (see daemon.work.forward.forward_summary), and the nodes sharing the database
    with what each holds (daemon.store.nodes.list_nodes; ``node_timeout_s``: after how long without a heartbeat a
    node counts as silent)."""
    with sessions() as session:
        counts = {state.value: 0 for state in JobState}
        for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            counts[JobState(state).value] = n
        failures = session.execute(
            select(Instance.sop_instance_uid, Job.state, Job.error, Job.attempts, Job.updated_at)
            .join(Instance, Job.instance_id == Instance.id)
            .where(Job.error.is_not(None), Job.state.in_([JobState.FAILED, JobState.QUEUED]))
            .order_by(Job.updated_at.desc())
            .limit(last_errors)
        ).all()
        return {
            "jobs": counts,
            "conflicts": _conflict_summary(session, last_errors),
            "instances": session.scalar(select(func.count()).select_from(Instance)),
            "studies": session.scalar(select(func.count()).select_from(Study)),
            "reports": _report_counts(session),
            "applicability": applicability_counts(session),
            "forwards": forward_summary(sessions, configured=forward_destinations, last_errors=last_errors),
            "nodes": list_nodes(session, node_timeout_s),
            "last_errors": [
                {
                    "sop_instance_uid": uid,
                    "state": JobState(state).value,
                    "attempts": attempts,
                    "error": error,
                    "at": _iso(at),
                }
                for uid, state, error, attempts, at in failures
            ],
        }


def _conflict_dict(row: IdentityConflict) -> dict[str, Any]:
    return {
        "state": "CONFLICT",
        "kind": row.kind.value if hasattr(row.kind, "value") else str(row.kind),
        "sop_instance_uid": row.sop_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "series_instance_uid": row.series_instance_uid,
        "reason": row.reason,
        "quarantine_file": row.path,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "calling_ae": row.calling_ae,
        "received_at": _iso(row.received_at),
    }


def _conflict_summary(session: Session, last: int) -> dict[str, Any]:
    """Images held by an identity conflict (daemon.store.instances): how many, and the most recent."""
    rows = session.scalars(select(IdentityConflict).order_by(IdentityConflict.id.desc()).limit(last)).all()
    return {
        "held": session.scalar(select(func.count()).select_from(IdentityConflict)) or 0,
        "last": [_conflict_dict(row) for row in rows],
    }


def _conflicts_for(session: Session, uid: str) -> list[IdentityConflict]:
    return list(
        session.scalars(
            select(IdentityConflict)
            .where(
                (IdentityConflict.sop_instance_uid == uid)
                | (IdentityConflict.series_instance_uid == uid)
                | (IdentityConflict.study_instance_uid == uid)
            )
            .order_by(IdentityConflict.id)
        )
    )


APPLICABILITY_STATES = ("withheld", "flagged", "in_domain", "unchecked", "off")


def applicability_counts(session: Session, instance_ids: Sequence[int] | None = None) -> dict[str, int]:
    """Images by the applicability gate's verdict on their newest prediction: withheld (no findings: outside the
    model's validated domain or an input-quality issue), flagged (findings with a warning), in_domain, unchecked (the
    model has no applicability model) and off (the gate was off: nothing checked). ``instance_ids`` limits the count
    to those images."""
    newest = select(func.max(PredictionRow.id)).group_by(PredictionRow.instance_id)
    if instance_ids is not None:
        newest = newest.where(PredictionRow.instance_id.in_(list(instance_ids)))
    counts = dict.fromkeys(APPLICABILITY_STATES, 0)
    rows = session.execute(
        select(PredictionRow.applicability_status, func.count())
        .where(PredictionRow.id.in_(newest))
        .group_by(PredictionRow.applicability_status)
    )
    for status, n in rows:
        key = status or "off"
        counts[key] = counts.get(key, 0) + n
    return counts


def _report_counts(session: Session) -> dict[str, int]:
    counts = {state.value: 0 for state in ReportState}
    for state, n in session.execute(select(StudyReportRow.state, func.count()).group_by(StudyReportRow.state)):
        counts[ReportState(state).value] = n
    return counts


def _predictions(session: Session, instance: Instance) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(PredictionRow).where(PredictionRow.instance_id == instance.id).order_by(PredictionRow.created_at)
    ).all()
    return [
        {
            "model_name": p.model_name,
            "model_version": p.model_version,
            "synthetic_model": p.synthetic_model,
            "created_at": _iso(p.created_at),
            "applicability": None
            if p.applicability_status is None
            else {
                "status": p.applicability_status,
                "score": p.applicability_score,
                "threshold": p.applicability_threshold,
                "quality": list(p.quality_issues or []),
            },
            "findings": [
                {
                    "label": f.label,
                    "probability": f.probability,
                    "threshold": f.threshold,
                    "status": f.status,
                    "reason": f.reason,
                    "region": f.region,
                    "evidence": [
                        {"channel": e.channel, "contribution": e.contribution, "share": e.share}
                        for e in sorted(f.evidence, key=lambda e: e.rank)
                    ],
                }
                for f in p.findings
            ],
        }
        for p in rows
    ]


def _reports(session: Session, study_ids: set[int]) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(StudyReportRow).where(StudyReportRow.study_id.in_(study_ids)).order_by(StudyReportRow.revision)
    ).all()
    return [
        {
            "revision": r.revision,
            "state": ReportState(r.state).value,
            "model_version": r.model_version,
            "error": r.error,
            "finished_at": _iso(r.finished_at),
            "files": [
                {"kind": f.kind, "path": f.path, "sha256": f.sha256, "sop_instance_uid": f.sop_instance_uid}
                for f in r.files
            ],
        }
        for r in rows
    ]


def list_studies(sessions: sessionmaker[Session], *, limit: int = 100) -> list[dict[str, Any]]:
    """Most recently received studies first, with instance counts and job states."""
    with sessions() as session:
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Study.study_date,
                func.count(func.distinct(Series.id)),
                func.count(func.distinct(Instance.id)),
                func.max(Instance.received_at),
            )
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Study.id)
            .order_by(func.max(Instance.received_at).desc())
            .limit(limit)
        ).all()
        out = []
        for uid, date, n_series, n_instances, last in rows:
            states = dict(
                session.execute(
                    select(Job.state, func.count())
                    .join(Instance, Job.instance_id == Instance.id)
                    .join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Study.study_instance_uid == uid)
                    .group_by(Job.state)
                ).all()
            )
            out.append(
                {
                    "study_instance_uid": uid,
                    "study_date": date,
                    "series": n_series,
                    "instances": n_instances,
                    "jobs": {JobState(k).value: v for k, v in states.items()},
                    "last_received": _iso(last),
                }
            )
        return out


def _instance_dict(instance: Instance) -> dict[str, Any]:
    job = max(instance.jobs, key=lambda j: j.id) if instance.jobs else None
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "series_instance_uid": instance.series.series_instance_uid,
        "study_instance_uid": instance.series.study.study_instance_uid,
        "modality": instance.modality,
        "body_part": instance.body_part,
        "view_position": instance.view_position,
        "transfer_syntax_uid": instance.transfer_syntax_uid,
        "path": instance.path,
        "size_bytes": instance.size_bytes,
        "calling_ae": instance.calling_ae,
        "received_at": _iso(instance.received_at),
        "skip_reason": instance.skip_reason,
        "image_stats": instance.image_stats,
        "job": None
        if job is None
        else {
            "state": JobState(job.state).value,
            "attempts": job.attempts,
            "error": job.error,
            "finished_at": _iso(job.finished_at),
        },
    }


def _instances_for(session: Session, uid: str) -> tuple[str, list[Instance]]:
    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == uid))
    if instance is not None:
        return "instance", [instance]
    series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
    if series is not None:
        return "series", list(series.instances)
    study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
    if study is not None:
        return "study", [i for s in study.series for i in s.instances]
    raise NotFoundError(f"no study, series or instance with UID {uid}")


def _study_identity(session: Session, uid: str, instances: list[Instance]) -> str | None:
    """How the study's patient is identified (the basis of its fingerprint; never the values), for ``show``."""
    study_ids = {i.series.study_id for i in instances}
    fingerprint = session.scalar(
        select(Study.patient_fingerprint).where(
            Study.id.in_(study_ids) if study_ids else Study.study_instance_uid == uid
        )
    )
    if fingerprint is None:
        return None
    basis = fingerprint.partition(":")[0]
    return {"id": "PatientID", "nm": "PatientName/PatientBirthDate"}.get(basis, "no patient identity")


def show(sessions: sessionmaker[Session], uid: str) -> dict[str, Any]:
    """Everything known about a study, series or instance UID, and the images held under it by an identity
    conflict. Raises NotFoundError when there is neither."""
    with sessions() as session:
        conflicts = _conflicts_for(session, uid)
        try:
            level, instances = _instances_for(session, uid)
        except NotFoundError:
            if not conflicts:
                raise
            level, instances = "conflict", []
        return {
            "uid": uid,
            "level": level,
            "patient_identified_by": _study_identity(session, uid, instances),
            "instances": [_instance_dict(i) | {"predictions": _predictions(session, i)} for i in instances],
            "applicability": applicability_counts(session, [i.id for i in instances]),
            "conflicts": [_conflict_dict(c) for c in conflicts],
            "reports": _reports(session, {i.series.study_id for i in instances}),
        }


def reprocess(sessions: sessionmaker[Session], uid: str) -> dict[str, int]:
    """Re-queue the jobs of a study, series or instance (attempts reset). Skipped instances stay skipped; images held
    by an identity conflict have no job and stay held (counted as ``conflicts``). Raises NotFoundError."""
    with sessions.begin() as session:
        conflicts = len(_conflicts_for(session, uid))
        try:
            _, instances = _instances_for(session, uid)
        except NotFoundError:
            if not conflicts:
                raise
            instances = []
        ids = [i.id for i in instances if not i.skip_reason]
        requeued = 0
        if ids:
            requeued = session.execute(
                update(Job)
                .where(Job.instance_id.in_(ids), Job.state != JobState.RUNNING)
                .values(
                    state=JobState.QUEUED,
                    attempts=0,
                    error=None,
                    finished_at=None,
                    available_at=utcnow(),
                    leased_by=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
    audit(
        sessions,
        "reprocess_requested",
        sop_instance_uid=uid if len(uid) <= 64 else None,
        detail=f"{requeued} job(s) re-queued; {conflicts} held by an identity conflict, not re-queued",
    )
    return {"requeued": requeued, "skipped": len(instances) - len(ids), "conflicts": conflicts}
