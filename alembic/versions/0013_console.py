"""The operations console: operator actions name who did them (stage_history.actor).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0013_console.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0013 has no downgrade: drop and re-create the database, then migrate"
    )
