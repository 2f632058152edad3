"""applicability gate: per prediction its status, score, threshold and input-quality issues

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 07:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("applicability_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("applicability_score", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("applicability_threshold", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("quality_issues", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_predictions_applicability_status"), ["applicability_status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_predictions_applicability_status"))
        batch_op.drop_column("quality_issues")
        batch_op.drop_column("applicability_threshold")
        batch_op.drop_column("applicability_score")
        batch_op.drop_column("applicability_status")
