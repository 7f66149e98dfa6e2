"""Foundation: pgqueuer 1.6.0 schema, the schema contract, stage history, enqueue, triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "pgqueuer/pgqueuer-1.6.0.sql")
    run_sql_file(op.get_bind(), "migrations/0001_foundation.sql")


def downgrade() -> None:
    raise NotImplementedError("0001 creates the whole schema; to undo it, drop the database.")
