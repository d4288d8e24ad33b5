"""Alembic environment: migrations always run on the connection :func:`service.migrations.upgrade` passes
in (inside its locked transaction); there is no URL in any ini file."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run Lethe's migrations through service.migrations.upgrade (or python -m service.migrations)")
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
