"""Security and bad input: closed SECURITY DEFINER functions, checked inputs, admin requests.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0007_security.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0007 has no downgrade: drop and re-create the database, then migrate"
    )
