"""Alembic migrations of the gateway's store (see `cloud_gateway.store.migrate`).

One revision per schema change, in ``versions/``. The store runs them itself
when it opens a database, so an existing store upgrades in place; new tables
(samples, rollouts, ...) are added as new revisions here, never with
``create_all``. Write one with ``alembic revision`` against ``alembic.ini``-less
config: copy the newest file, set ``down_revision`` to its ``revision``.
"""
