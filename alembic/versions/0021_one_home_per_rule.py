"""One SQL home for each rule the pipeline also has in Python; a comment on every object.

Revision ID: 0021
Revises: 0017
Create Date: 2026-12-06
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0021_one_home_per_rule.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0021 has no downgrade: drop and re-create the database, then migrate"
    )
