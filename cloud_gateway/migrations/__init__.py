"""Alembic migrations of the gateway's store (see `cloud_gateway.store.database.migrate`).

One revision per schema change, in ``versions/``. The store runs them itself
when it opens a database, so an existing store upgrades in place; new tables
(samples, rollouts, ...) are added as new revisions here, never with
``create_all``: copy the newest file, give it the next ``revision`` and set its
``down_revision`` to the previous one; change the tables in ``cloud_gateway/store/``
(each beside its store) to match (tests/gateway/test_store_migrations.py compares the two).
"""
