"""The distance between a trainer's neighbouring home sessions has one home: kc_settings.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0023_one_distance.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0023 has no downgrade: drop and re-create the database, then migrate"
    )
