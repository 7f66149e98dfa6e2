"""Time passes: completion, leaving trainers, reschedule, make-ups.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0009_time_passes.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0009 has no downgrade: drop and re-create the database, then migrate"
    )
