"""Lifecycle: upgrades, refunds, healing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0003_lifecycle.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0003 has no downgrade: drop and re-create the database, then migrate"
    )
