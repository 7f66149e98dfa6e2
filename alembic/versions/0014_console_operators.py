"""Console operators: one token per person, sessions in the database, the actor decided by
the database.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0014_console_operators.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0014 has no downgrade: drop and re-create the database, then migrate"
    )
