"""Matching: admin assignment requests, capacity override, automatic retries of pending.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0002_matching.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0002 has no downgrade: drop and re-create the database, then migrate"
    )
