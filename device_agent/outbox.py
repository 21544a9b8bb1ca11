"""On-disk outbox for telemetry: store first, forward when the broker acks.

Every telemetry window is written to SQLite before it is published, and its
row is deleted only after the broker's PUBACK; rows are sent strictly oldest
first, one at a time, so windows arrive in order after any outage. A duplicate
can happen (ack lost with the connection), which is why each window carries a
sequence number the gateway deduplicates on: together, exactly once.

Bounded: past ``max_rows`` the policy drops either the oldest or the newest
window, and the drop is counted (persisted, and reported in telemetry).
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from pathlib import Path

from edgecore.errors import AgentError


class DropPolicy(str, enum.Enum):
    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"


class Outbox:
    def __init__(self, path: Path | str, *, max_rows: int = 10000, policy: DropPolicy = DropPolicy.DROP_OLDEST):
        if max_rows < 1:
            raise AgentError(f"outbox max_rows must be >= 1, got {max_rows}")
        self.path = str(path)
        self.max_rows = max_rows
        self.policy = DropPolicy(policy)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 0)")
        except sqlite3.Error as e:
            raise AgentError(f"cannot open outbox {self.path}: {e}") from e

    def next_seq(self) -> int:
        """A persistent, monotonically increasing window number (survives agent restarts)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            (seq,) = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            self._db.execute("UPDATE meta SET value=value+1 WHERE key='next_seq'")
            self._db.execute("COMMIT")
            return int(seq)

    def put(self, topic: str, payload: bytes) -> bool:
        """Store a message; returns False when the drop-newest policy refused it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                if n >= self.max_rows:
                    excess = n - self.max_rows + 1
                    if self.policy is DropPolicy.DROP_NEWEST:
                        self._db.execute("UPDATE meta SET value=value+1 WHERE key='dropped'")
                        self._db.execute("COMMIT")
                        return False
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)
                    )
                    self._db.execute("UPDATE meta SET value=value+? WHERE key='dropped'", (excess,))
                self._db.execute(
                    "INSERT INTO outbox (topic, payload, created) VALUES (?, ?, ?)", (topic, payload, time.time())
                )
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def peek(self) -> tuple[int, str, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT 1").fetchone()
        return (int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def ack(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
