"""The app's payment metadata: learning mode, hybrid sessions, group size, chosen trainer.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0008_app_metadata.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0008 has no downgrade: drop and re-create the database, then migrate"
    )
