"""Shared fixtures come from plugins, one module per part of the project."""

pytest_plugins = [
    "tests.fixtures.pipeline",  # tiny trained run directory (toolchain)
    "tests.fixtures.detection",  # tiny trained detection run directory (task = "detect")
    "tests.fixtures.bundles",  # bundles built from it (targets)
    "tests.fixtures.broker",  # a real Mosquitto broker with auth + ACL (agent/gateway)
    "tests.fixtures.anon_broker",  # a real Mosquitto that allows anonymous clients
    "tests.fixtures.postgres",  # a real PostgreSQL server (gateway store)
]
