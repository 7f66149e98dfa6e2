"""No double booking: the standard btree_gist exclusion constraint replaces the md5 box.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-22
"""

from alembic import op
from workers.database.migrate import run_sql_file

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file(op.get_bind(), "migrations/0010_standard_overlap_constraint.sql")


def downgrade() -> None:
    raise NotImplementedError(
        "0010 has no downgrade: drop and re-create the database, then migrate"
    )
