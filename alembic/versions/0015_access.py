"""Access: only the project's roles connect; workers add history but never change it or set
a sequence; reschedule's start date at most a year ahead.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0015_access.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0015 has no downgrade: drop and re-create the database, then migrate"
    )
