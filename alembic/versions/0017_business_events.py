"""Business events for the app: an outbox written in the transaction of each change.

Revision ID: 0017
Revises: 0013
Create Date: 2026-11-23
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0017_business_events.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0017 has no downgrade: drop and re-create the database, then migrate"
    )
