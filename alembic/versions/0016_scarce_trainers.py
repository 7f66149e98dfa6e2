"""When trainers are scarce: job priorities, one history line per job created, retry
triggers once per statement (issue 22; issue 21, item 10).

Revision ID: 0016
Revises: 0013
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0016_scarce_trainers.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0016 has no downgrade: drop and re-create the database, then migrate"
    )
