"""The pending-allocation sweep backs off per row and is bounded per run.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0006_sweep_backoff.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0006 has no downgrade: drop and re-create the database, then migrate"
    )
