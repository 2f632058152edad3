"""Radiologist feedback: a verdict (present/absent) on one finding of one stored image, kept in the database and
usable as validation data by the maintenance jobs (``chexd calibrate/correct/finetune --feedback``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DaemonError
from daemon.store.tables import AuditEvent, Feedback, Instance, Series, Study
from model.types import LABELS


class FeedbackError(DaemonError, ValueError):
    """Unknown finding or image; the message says which."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FeedbackItem:
    """One image with feedback: its stored file and the verdicts on it (finding -> present), newest per finding."""

    sop_instance_uid: str
    study_instance_uid: str
    path: Path
    verdicts: dict[str, bool]


def canonical_finding(name: str) -> str:
    """The label as chexd spells it ('pleural thickening' -> 'Pleural_Thickening'). Raises FeedbackError."""
    wanted = name.strip().lower().replace(" ", "_")
    for label in LABELS:
        if label.lower() == wanted:
            return label
    raise FeedbackError(f"unknown finding {name!r} - expected one of: {', '.join(LABELS)}")


def record(
    sessions: sessionmaker[Session], uid: str, finding: str, *, present: bool, user: str, note: str | None = None
) -> Feedback:
    """Store one verdict on a received image. Raises FeedbackError for an unknown finding or SOP Instance UID."""
    label = canonical_finding(finding)
    with sessions.begin() as session:
        if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == uid)) is None:
            raise FeedbackError(f"no received image has SOP Instance UID {uid} - 'chexd studies' lists them")
        row = Feedback(sop_instance_uid=uid, finding=label, present=present, user=user, note=note)
        session.add(row)
        verdict = "present" if present else "absent"
        session.add(AuditEvent(event="feedback", sop_instance_uid=uid, detail=f"{label} {verdict} by {user}"))
        session.flush()
        return row


def feedback_items(sessions: sessionmaker[Session], spool_dir: Path) -> list[FeedbackItem]:
    """Every image with feedback and its newest verdict per finding, oldest image first."""
    with sessions() as session:
        rows = session.execute(
            select(Feedback, Instance.path, Study.study_instance_uid)
            .join(Instance, Instance.sop_instance_uid == Feedback.sop_instance_uid)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .order_by(Feedback.created_at, Feedback.id)
        ).all()
    items: dict[str, FeedbackItem] = {}
    for fb, path, study_uid in rows:
        item = items.get(fb.sop_instance_uid)
        if item is None:
            item = items[fb.sop_instance_uid] = FeedbackItem(
                sop_instance_uid=fb.sop_instance_uid, study_instance_uid=study_uid, path=spool_dir / path, verdicts={}
            )
        item.verdicts[fb.finding] = fb.present  # later rows overwrite earlier ones
    return list(items.values())
