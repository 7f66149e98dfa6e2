"""A trainer's leave and substitutes for single sessions (issue 24, part B).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0019_trainer_leave.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0019 has no downgrade: drop and re-create the database, then migrate"
    )
