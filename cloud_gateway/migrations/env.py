"""Alembic environment: runs on the connection `cloud_gateway.store.database.migrate` hands over."""

from __future__ import annotations

from alembic import context

from cloud_gateway.store import meta

connection = context.config.attributes["connection"]
# batch mode: SQLite cannot ALTER most things, Alembic copies the table instead (a no-op on PostgreSQL)
context.configure(connection=connection, target_metadata=meta, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
