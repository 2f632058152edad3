"""ORM tables (SQLAlchemy 2.x). Every change here needs an Alembic revision in ``migrations/versions``.

No patient names or IDs are stored: rows carry UIDs, file locations and processing state; the DICOM file in the
spool is the one copy of the patient data. Studies carry a keyed fingerprint of their patient's identity
(daemon.store.identity: HMAC-SHA256 under a secret kept outside the database), which can be compared but not reversed.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID_LENGTH = 64

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no zone, so store naive UTC and re-attach it)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} - chexd stores aware UTC datetimes only")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    # daemon.store.identity fingerprint of the study's patient: "<basis>:<key id>:<hmac>", "none" (images without any
    # identity), NULL (stored before revision 0004: the first image after the upgrade claims the study)
    patient_fingerprint: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the stored file; NULL for rows before revision 0004
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    skip_reason: Mapped[str | None] = mapped_column(Text)
    image_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    jobs: Mapped[list[Job]] = relationship(back_populates="instance")
    predictions: Mapped[list[PredictionRow]] = relationship(back_populates="instance")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_available", "state", "available_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="process")
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, name="job_state", native_enum=False, length=16), default=JobState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    leased_by: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    instance: Mapped[Instance] = relationship(back_populates="jobs")


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    detail: Mapped[str | None] = mapped_column(Text)


class ConflictKind(enum.StrEnum):
    STUDY = "study"  # StudyInstanceUID known under another patient fingerprint
    SERIES = "series"  # SeriesInstanceUID known under another StudyInstanceUID
    SOP = "sop"  # SOPInstanceUID known with other content


class IdentityConflict(Base):
    """An acknowledged image held back because merging it would mix patients, studies or contents. It has no
    instance, series or study row (nothing of the existing study sees it); its bytes are in the quarantine folder
    (``path``, relative to it) beside a reason file. Rows stay for audit; see README "Patient identity conflicts"."""

    __tablename__ = "identity_conflicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[ConflictKind] = mapped_column(
        Enum(
            ConflictKind,
            name="conflict_kind",
            native_enum=False,
            length=16,
            values_callable=lambda kinds: [k.value for k in kinds],
        )
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    reason: Mapped[str] = mapped_column(Text)  # names attributes, never their values
    path: Mapped[str] = mapped_column(Text)  # relative to the quarantine folder
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    patient_fingerprint: Mapped[str] = mapped_column(String(80))  # of the held image
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class PredictionRow(Base):
    """One model's output for one instance. Reprocessing with the same model version updates the row (one per
    instance and version); another version adds a row."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("instance_id", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    synthetic_model: Mapped[bool] = mapped_column(default=False)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)  # label -> probability in [0, 1]
    logits: Mapped[dict[str, float]] = mapped_column(JSON)  # label -> logit
    # the applicability gate (revision 0005; all NULL when the policy was off): in_domain | withheld | flagged |
    # unchecked (no applicability model), the score and its threshold (NULL without an applicability model), the
    # input-quality issues [{code, reason}]
    applicability_status: Mapped[str | None] = mapped_column(String(16), index=True)
    applicability_score: Mapped[float | None] = mapped_column()
    applicability_threshold: Mapped[float | None] = mapped_column()
    quality_issues: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="predictions")
    findings: Mapped[list[FindingRow]] = relationship(back_populates="prediction", cascade="all, delete-orphan")


class ModelState(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class ModelVersion(Base):
    """One model artifact known to the registry. Exactly one row is ``active`` once anything has been activated;
    jobs only ever add ``candidate`` rows."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)  # model.artifact.Manifest.version_id
    name: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    manifest_path: Mapped[str] = mapped_column(Text)  # absolute path of the artifact's JSON manifest
    parent_version: Mapped[str | None] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    synthetic: Mapped[bool] = mapped_column(default=False)
    state: Mapped[ModelState] = mapped_column(
        Enum(
            ModelState,
            name="model_state",
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
        ),
        default=ModelState.CANDIDATE,
        index=True,
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AdminJob(Base):
    """A maintenance job run from the CLI (calibrate, correct, finetune, compress, decide, activate...)."""

    __tablename__ = "admin_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16))  # running, done, failed, refused
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_s: Mapped[float | None] = mapped_column()


class Feedback(Base):
    """A radiologist's verdict on one finding of one image; the newest row per (instance, finding) counts."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column()
    user: Mapped[str] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FindingRow(Base):
    """One finding of one prediction as reported: status present/absent/excluded with threshold and region."""

    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("prediction_id", "label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column()
    threshold: Mapped[float] = mapped_column()
    status: Mapped[str] = mapped_column(String(16))  # present, absent, excluded
    reason: Mapped[str | None] = mapped_column(Text)
    region: Mapped[str | None] = mapped_column(String(64))  # zone with the largest share of heat
    regions: Mapped[dict[str, float] | None] = mapped_column(JSON)  # zone -> share of heat

    prediction: Mapped[PredictionRow] = relationship(back_populates="findings")
    evidence: Mapped[list[EvidenceRow]] = relationship(back_populates="finding", cascade="all, delete-orphan")


class EvidenceRow(Base):
    """A top channel behind a reported finding: contribution w_ck * mean(A_k) in logit units and share of the logit."""

    __tablename__ = "channel_evidence"

    id: Mapped[int] = mapped_column(primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    channel: Mapped[int] = mapped_column(Integer)
    contribution: Mapped[float] = mapped_column()
    share: Mapped[float] = mapped_column()

    finding: Mapped[FindingRow] = relationship(back_populates="evidence")


class ReportState(enum.StrEnum):
    PENDING = "PENDING"  # waiting for the study's quiet time
    WRITING = "WRITING"  # claimed by a report writer until due_at (its lease); a later image opens a new revision
    DONE = "DONE"
    SUPERSEDED = "SUPERSEDED"
    FAILED = "FAILED"


class StudyReportRow(Base):
    """One revision of a study's report. A later image makes a new PENDING revision; when it is written, the
    previous DONE revision becomes SUPERSEDED."""

    __tablename__ = "study_reports"
    __table_args__ = (UniqueConstraint("study_id", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[ReportState] = mapped_column(
        Enum(ReportState, name="report_state", native_enum=False, length=16), default=ReportState.PENDING, index=True
    )
    due_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    model_version: Mapped[str | None] = mapped_column(String(64))
    instance_uids: Mapped[list[str] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    files: Mapped[list[ReportFile]] = relationship(back_populates="report", cascade="all, delete-orphan")


class ReportFile(Base):
    """A written result document: kind pdf (plain PDF), sr, sc or epdf (DICOM objects), with its hash."""

    __tablename__ = "report_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("study_reports.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    sha256: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    report: Mapped[StudyReportRow] = relationship(back_populates="files")


class ForwardState(enum.StrEnum):
    QUEUED = "QUEUED"
    DONE = "DONE"
    DEAD = "DEAD"  # gave up after the configured attempts; `chexd forward --retry` re-queues


class Forward(Base):
    """Delivery of one DICOM result file to one configured destination (C-STORE SCU), retried with backoff."""

    __tablename__ = "forwards"
    __table_args__ = (
        UniqueConstraint("report_file_id", "destination"),
        Index("ix_forwards_state_available", "state", "available_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    report_file_id: Mapped[int] = mapped_column(ForeignKey("report_files.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    state: Mapped[ForwardState] = mapped_column(
        Enum(ForwardState, name="forward_state", native_enum=False, length=16), default=ForwardState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the node (its holder, host/pid) sending it now; NULL when not claimed (revision 0006: taken over when it dies)
    claimed_by: Mapped[str | None] = mapped_column(String(128))


class NodeState(enum.StrEnum):
    ALIVE = "alive"  # heartbeating (or not yet noticed dead: see daemon.store.nodes.is_live)
    STOPPED = "stopped"  # ended cleanly; held nothing
    DEAD = "dead"  # missed its heartbeats for node_timeout_seconds: another node took over what it held


class Node(Base):
    """One ``chexd serve`` process sharing this database (revision 0006). ``holder`` (``host/pid``) prefixes every
    lease it takes: jobs.leased_by (``holder/<thread>``), study_reports.error while WRITING, forwards.claimed_by.
    Rows stay after a node stops or dies, for ``chexd status``; a new process with the same holder (a reused pid)
    takes its row over."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(64))  # comma-separated, daemon.settings.ROLES
    version: Mapped[str] = mapped_column(String(32))  # chexd's
    state: Mapped[NodeState] = mapped_column(
        Enum(
            NodeState,
            name="node_state",
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
        ),
        default=NodeState.ALIVE,
    )
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # stopped, or declared dead
