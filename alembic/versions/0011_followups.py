"""An enqueue that arrives while the row's job is running is carried out after it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0011_followups.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0011 has no downgrade: drop and re-create the database, then migrate"
    )
