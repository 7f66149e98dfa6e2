"""A trainer's live allocations counted by the database (trainer_load), settled at commit.

Revision ID: 0020
Revises: 0017
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0020_trainer_load.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0020 has no downgrade: drop and re-create the database, then migrate"
    )
