"""Alembic environment: one transaction per migration, under an advisory lock, with timeouts.

Two workers starting at once both call `migrate`; the advisory lock makes the second wait
for the first and then find nothing to do. `lock_timeout` keeps a migration from queueing
behind a long transaction while holding locks that block the whole pipeline.
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine, pool, text

from alembic import context
from workers.database.migrate import sqlalchemy_url

# Any constant works; this one spells "kcmigrat" in ASCII.
MIGRATION_LOCK_KEY = 0x6B636D6967726174

config = context.config


def database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set: export it, or use 'make migrate'.")
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=sqlalchemy_url(database_url()), literal_binds=True, transaction_per_migration=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(database_url()), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text("SET statement_timeout = '5min'"))
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        # Each migration file runs as kc_owner once 0005 has set it up (workers.database.migrate
        # runs sql/migrations/before_each.sql first), so the session stays the migrating user.
        connection.commit()
        try:
            context.configure(connection=connection, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
