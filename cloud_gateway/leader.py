"""One process at a time does the fleet's work (rollouts, the refresh policy): the leader.

Every gateway process answers requests, ingests telemetry and serves the API; only the one holding the leader
lock drives rollouts and evaluates the policy, so two replicas never send the same rollout's commands or start
two refreshes from one trigger. The lock is one the database server (or the kernel) releases by itself when its
holder dies, so a replica takes over within one poll of the leader's death, with nothing to clean up:

* PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a connection held for it; the server
  releases it when the process dies or the connection drops (then this process also stops leading).
* SQLite: an exclusive ``flock`` on ``<database>.leader`` beside the database file (replicas of one SQLite
  database share a machine); the kernel releases it when the process exits, however it exits.
* An in-memory database has one process by definition: always the leader.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

LEADER_LOCK = 0x6564_6766  # pg advisory lock key ("edgf"; migrations use "edge")


class Leadership:
    """``try_acquire()`` -> whether this process leads now; ``held()`` checks it still does; ``release()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None  # PostgreSQL: the connection holding the advisory lock
        self._fd: int | None = None  # SQLite: the flocked file
        self.leading = False
        url = engine.url
        self.kind = "postgresql" if url.get_backend_name() == "postgresql" else "sqlite"
        db = url.database if self.kind == "sqlite" else None
        self.path = Path(f"{db}.leader") if db and db != ":memory:" else None

    def try_acquire(self) -> bool:
        with self._lock:
            if self.leading:
                return True
            try:
                self.leading = self._acquire_pg() if self.kind == "postgresql" else self._acquire_file()
            except (SQLAlchemyError, OSError) as e:  # the database away: not the leader, asked again next poll
                log.warning("leader lock not taken: %s", e)
                self._drop()
            return self.leading

    def _acquire_pg(self) -> bool:
        if self._conn is None:
            self._conn = self.engine.connect()
        got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK}).scalar())
        self._conn.commit()  # (the lock is the session's, not the transaction's)
        if not got:
            self._drop()
        return got

    def _acquire_file(self) -> bool:
        if self.path is None:
            return True
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who leads, for a person looking
        self._fd = fd
        return True

    def held(self) -> bool:
        """Whether this process still leads (PostgreSQL: its lock's connection still answers)."""
        with self._lock:
            if not self.leading:
                return False
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT 1")).scalar()
                    self._conn.commit()
                except SQLAlchemyError as e:
                    log.error("lost the leader lock (its database connection failed: %s)", e)
                    self.leading = False
                    self._drop()
            return self.leading

    def release(self) -> None:
        with self._lock:
            if self.leading and self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LEADER_LOCK})
                    self._conn.commit()
                except SQLAlchemyError:
                    pass  # closing the connection releases it too
            self.leading = False
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()  # never back into the pool: a pooled connection would keep the lock
                self._conn.close()
            except SQLAlchemyError:
                pass
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
