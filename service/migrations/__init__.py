"""Alembic migrations of the job store, run by :class:`service.store.Store` at start-up (SQLite and PostgreSQL).

The chain is linear and each revision small: ``0001_initial_schema`` is the schema as it stood before
migrations existed (so a store created by ``metadata.create_all`` is stamped at 0001 and upgraded from
there), later revisions add one concern each. ``service.store.metadata`` always equals the head revision's
schema; ``tests/service/test_store_migrations.py`` checks that on both databases.

Several processes may start at once on one store (API replicas, workers): the upgrade runs in ONE
transaction holding a database-wide lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock
on PostgreSQL, whose DDL is transactional), so exactly one of them migrates and the others find the head.

Adding a revision: copy the newest file in ``versions/``, set ``down_revision`` to its ``revision`` and keep
``service.store.metadata`` in step. By hand: ``python -m service.migrations upgrade --store-url URL`` (or
``current``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent
INITIAL_REVISION = "0001_initial_schema"
_MIGRATION_LOCK_KEY = 7_304_119_001  # pg_advisory_xact_lock key of schema upgrades (any constant of Lethe's)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: sa.Connection) -> None:
    """Bring the store to the head revision inside the caller's open transaction (which holds the lock).

    A store created before migrations existed (Lethe's tables, no ``alembic_version``) is stamped at the
    initial revision first: its tables are exactly that revision's.
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
    if current_revision(connection) == head_revision():
        return
    config = alembic_config()
    config.attributes["connection"] = connection
    tables = set(sa.inspect(connection).get_table_names())
    if "alembic_version" not in tables and "jobs" in tables:
        command.stamp(config, INITIAL_REVISION)
    command.upgrade(config, "head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.migrations", description="job store migrations")
    parser.add_argument("action", choices=["upgrade", "current", "head"])
    parser.add_argument("--store-url", help="SQLAlchemy URL (default LETHE_JOB_STORE_URL / the embedded store)")
    args = parser.parse_args(argv)
    if args.action == "head":
        print(head_revision())
        return 0
    from service.settings import Settings
    from service.store import Store

    url = args.store_url or Settings().job_store_url
    store = Store(url, migrate=args.action == "upgrade")
    try:
        with store.read() as connection:
            print(current_revision(connection))
    finally:
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
