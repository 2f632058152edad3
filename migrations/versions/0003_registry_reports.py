"""registry, feedback, findings, reports, forwards

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 06:55:54.538307
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("duration_s", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_jobs")),
    )
    with op.batch_alter_table("admin_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_jobs_kind"), ["kind"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_sop_instance_uid"), ["sop_instance_uid"], unique=False)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("manifest_path", sa.Text(), nullable=False),
        sa.Column("parent_version", sa.String(length=64), nullable=True),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("synthetic", sa.Boolean(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("candidate", "active", "retired", name="model_state", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("activated_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_state"), ["state"], unique=False)

    op.create_table(
        "study_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("PENDING", "DONE", "SUPERSEDED", "FAILED", name="report_state", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("instance_uids", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_reports_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_reports")),
        sa.UniqueConstraint("study_id", "revision", name=op.f("uq_study_reports_study_id")),
    )
    with op.batch_alter_table("study_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_reports_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_reports_study_id"), ["study_id"], unique=False)

    op.create_table(
        "report_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["study_reports.id"],
            name=op.f("fk_report_files_report_id_study_reports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_files")),
    )
    with op.batch_alter_table("report_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_report_files_report_id"), ["report_id"], unique=False)

    op.create_table(
        "forwards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_file_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column(
            "state",
            sa.Enum("QUEUED", "DONE", "DEAD", name="forward_state", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("available_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["report_file_id"],
            ["report_files.id"],
            name=op.f("fk_forwards_report_file_id_report_files"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forwards")),
        sa.UniqueConstraint("report_file_id", "destination", name=op.f("uq_forwards_report_file_id")),
    )
    with op.batch_alter_table("forwards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_forwards_report_file_id"), ["report_file_id"], unique=False)
        batch_op.create_index("ix_forwards_state_available", ["state", "available_at"], unique=False)

    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("probability", sa.Double(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("regions", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_findings_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
        sa.UniqueConstraint("prediction_id", "label", name=op.f("uq_findings_prediction_id")),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_findings_prediction_id"), ["prediction_id"], unique=False)

    op.create_table(
        "channel_evidence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("finding_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("channel", sa.Integer(), nullable=False),
        sa.Column("contribution", sa.Double(), nullable=False),
        sa.Column("share", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["finding_id"], ["findings.id"], name=op.f("fk_channel_evidence_finding_id_findings"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_evidence")),
    )
    with op.batch_alter_table("channel_evidence", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_channel_evidence_finding_id"), ["finding_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("channel_evidence", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_channel_evidence_finding_id"))

    op.drop_table("channel_evidence")
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_findings_prediction_id"))

    op.drop_table("findings")
    with op.batch_alter_table("forwards", schema=None) as batch_op:
        batch_op.drop_index("ix_forwards_state_available")
        batch_op.drop_index(batch_op.f("ix_forwards_report_file_id"))

    op.drop_table("forwards")
    with op.batch_alter_table("report_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_files_report_id"))

    op.drop_table("report_files")
    with op.batch_alter_table("study_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_reports_study_id"))
        batch_op.drop_index(batch_op.f("ix_study_reports_state"))

    op.drop_table("study_reports")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_state"))

    op.drop_table("model_versions")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_sop_instance_uid"))

    op.drop_table("feedback")
    with op.batch_alter_table("admin_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_jobs_kind"))

    op.drop_table("admin_jobs")
