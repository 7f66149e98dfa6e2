"""Roles: kc_owner (migrates, owns), kc_worker (the stages), kc_operator (views, replays).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0005_roles.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0005 has no downgrade: drop and re-create the database, then migrate"
    )
