"""The leave's safety net: sessions written into an approved leave afterwards are covered.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0022_leave_cover.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0022 has no downgrade: drop and re-create the database, then migrate"
    )
