"""One session at a time: whether a trainer can take one session then, moves of one session.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0018_session_moves.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0018 has no downgrade: drop and re-create the database, then migrate"
    )
