"""Operations: trace/overview/failure/stuck views, SQL replays, crash-proof attempt counting,
retention, queue autovacuum.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0004_operations.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0004 has no downgrade: drop and re-create the database, then migrate"
    )
