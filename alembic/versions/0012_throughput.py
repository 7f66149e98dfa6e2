"""Throughput: a trainer lock to try, an inlined distance, the largest radius at once.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0012_throughput.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0012 has no downgrade: drop and re-create the database, then migrate"
    )
