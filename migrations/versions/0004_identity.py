"""patient identity: study fingerprints, instance file hashes, identity conflicts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 02:25:27.376265
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "identity_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("study", "series", "sop", name="conflict_kind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("patient_fingerprint", sa.String(length=80), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_conflicts")),
    )
    with op.batch_alter_table("identity_conflicts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_identity_conflicts_received_at"), ["received_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_identity_conflicts_series_instance_uid"), ["series_instance_uid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_identity_conflicts_sop_instance_uid"), ["sop_instance_uid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_identity_conflicts_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_fingerprint", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("patient_fingerprint")

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("sha256")

    with op.batch_alter_table("identity_conflicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identity_conflicts_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_identity_conflicts_sop_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_identity_conflicts_series_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_identity_conflicts_received_at"))

    op.drop_table("identity_conflicts")
