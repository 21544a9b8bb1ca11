"""On-disk outbox for telemetry: store first, forward when the broker acks.

Every telemetry window is written to SQLite before it is published, and its
row is deleted only after the broker's PUBACK, or, once a gateway has
acknowledged a window of this outbox, only after the gateway's own
acknowledgement on ``<prefix>/<id>/telemetry/ack`` (a window the broker took
can still be lost on the way: a broker without persistence restarting, a
gateway whose database is down); a row the broker took but no gateway
acknowledged is sent again after a while. Rows are sent oldest first, one at a
time. A duplicate can happen, which is why each window carries (boot, seq), on
which the gateway deduplicates (and acknowledges again): together, exactly once.

Bounded: past ``max_rows`` the policy drops either the oldest or the newest
window (never the one being forwarded: its delivery may still complete),
and the drop is counted, in messages and in the inputs they accounted for
(cumulative over the life of the state dir, persisted, and reported in every
telemetry window).
"""

from __future__ import annotations

import enum
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from edgecore.errors import AgentError


class DropPolicy(str, enum.Enum):
    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"


ACKED_BY = ("gateway", "broker")


class Outbox:
    """``acked_by``: ``gateway`` (a window leaves only when the gateway says it stored it, or refused it for good)
    or ``broker`` (for a gateway that does not acknowledge: it leaves at the broker's PUBACK until a gateway's
    acknowledgement is first seen, then as with ``gateway``)."""

    def __init__(self, path: Path | str, *, max_rows: int = 10000, policy: DropPolicy = DropPolicy.DROP_OLDEST,
                 acked_by: str = "gateway"):
        if max_rows < 1:
            raise AgentError(f"outbox max_rows must be >= 1, got {max_rows}")
        if acked_by not in ACKED_BY:
            raise AgentError(f"telemetry_acked_by must be one of {', '.join(ACKED_BY)}, got {acked_by!r}")
        self.acked_by = acked_by
        self.path = str(path)
        self.max_rows = max_rows
        self.policy = DropPolicy(policy)
        self._lock = threading.Lock()
        self._inflight = -1  # the row the forwarder is publishing
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._create()
        except sqlite3.Error as e:
            raise AgentError(f"cannot open outbox {self.path}: {e}") from e

    def _create(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL, inputs INTEGER NOT NULL DEFAULT 0)"
        )
        cols = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
        if "inputs" not in cols:  # an older outbox
            db.execute("ALTER TABLE outbox ADD COLUMN inputs INTEGER NOT NULL DEFAULT 0")
        if "seq" not in cols:  # the window's seq, for the gateway's acknowledgement; and when it was last sent
            db.execute("ALTER TABLE outbox ADD COLUMN seq INTEGER")
            db.execute("ALTER TABLE outbox ADD COLUMN sent REAL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        for key, value in (("dropped", 0), ("dropped_inputs", 0), ("next_seq", 0), ("last_put_seq", -1),
                           ("boot", secrets.randbits(52)), ("gateway_acks", 0)):
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    @property
    def boot(self) -> str:
        """A random id made with this outbox (the state dir): windows are unique on (device, boot, seq)."""
        with self._lock:
            return f"{self._meta('boot'):013x}"

    @property
    def last_put_seq(self) -> int:
        """The highest window seq stored (or dropped by the drop-newest policy); -1 before the first."""
        with self._lock:
            return self._meta("last_put_seq")

    def next_seq(self) -> int:
        """A persistent, monotonically increasing window number (survives agent restarts)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._meta("next_seq")
            self._db.execute("UPDATE meta SET value=value+1 WHERE key='next_seq'")
            self._db.execute("COMMIT")
            return int(seq)

    def put(self, topic: str, payload: bytes, *, inputs: int = 0, seq: int | None = None) -> bool:
        """Store a message; returns False when the drop-newest policy refused it.

        ``inputs``: how many inputs the message accounts for (counted in
        ``dropped_inputs`` if it is ever dropped); ``seq``: the window it
        closes, recorded in the same transaction (see `last_put_seq`).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored = self._put(topic, payload, inputs, seq)
                if seq is not None:
                    self._db.execute("UPDATE meta SET value=MAX(value, ?) WHERE key='last_put_seq'", (seq,))
                self._db.execute("COMMIT")
                return stored
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _put(self, topic: str, payload: bytes, inputs: int, seq: int | None = None) -> bool:
        db = self._db
        (n,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if n >= self.max_rows:
            if self.policy is DropPolicy.DROP_NEWEST:
                self._count_drop(1, inputs)
                return False
            # never the row being forwarded: the MQTT client may still deliver its copy after a reconnect,
            # and a window both delivered and counted as dropped would be counted twice
            old = "SELECT id FROM outbox WHERE id != ? ORDER BY id LIMIT ?"
            args = (self._inflight, n - self.max_rows + 1)
            # a row the broker took (waiting for the gateway's acknowledgement) is not counted: it was delivered
            # as far as the broker goes, and most likely stored; counting it could count its inputs twice
            (k, lost) = db.execute(f"SELECT COUNT(*), COALESCE(SUM(inputs), 0) FROM outbox WHERE id IN ({old})"
                                   " AND sent IS NULL", args).fetchone()
            db.execute(f"DELETE FROM outbox WHERE id IN ({old})", args)
            self._count_drop(int(k), int(lost))
        db.execute("INSERT INTO outbox (topic, payload, created, inputs, seq) VALUES (?, ?, ?, ?, ?)",
                   (topic, payload, time.time(), inputs, seq))
        return True

    def _count_drop(self, rows: int, inputs: int) -> None:
        self._db.execute("UPDATE meta SET value=value+? WHERE key='dropped'", (rows,))
        self._db.execute("UPDATE meta SET value=value+? WHERE key='dropped_inputs'", (inputs,))

    def peek(self, *, resend_after_s: float = 30.0) -> tuple[int, str, bytes] | None:
        """The oldest row to send, now marked in flight (the bound will not drop it) until `ack` or `sent`.

        A row is to send when it was never sent, or sent ``resend_after_s`` ago without the gateway's
        acknowledgement (`gateway_acked`)."""
        with self._lock:
            row = self._db.execute("SELECT id, topic, payload FROM outbox WHERE sent IS NULL OR sent < ? "
                                   "ORDER BY id LIMIT 1", (time.time() - resend_after_s,)).fetchone()
            self._inflight = int(row[0]) if row else -1
        return (int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def ack(self, row_id: int) -> None:
        """The broker has the row: keep it, marked sent, until the gateway says it stored it; with
        ``acked_by="broker"`` delete it, until a gateway's acknowledgement was first seen (`acks_from_gateway`)."""
        with self._lock:
            if self.acked_by == "gateway" or self._meta("gateway_acks"):
                self._db.execute("UPDATE outbox SET sent=? WHERE id=?", (time.time(), row_id))
            else:
                self._db.execute("DELETE FROM outbox WHERE id=?", (row_id,))
            if row_id == self._inflight:
                self._inflight = -1

    def overdue(self, older_than_s: float) -> int:
        """Windows the broker took at least ``older_than_s`` ago that no gateway acknowledged since."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NOT NULL AND sent < ?",
                                    (time.time() - older_than_s,)).fetchone()
        return int(n)

    @property
    def acks_from_gateway(self) -> bool:
        """Whether a gateway has acknowledged a window of this outbox: from then on a row is deleted only when
        the gateway says it stored it (or refused it for good), not when the broker took it."""
        with self._lock:
            return bool(self._meta("gateway_acks"))

    def gateway_acked(self, boot: str, seq: int, *, stored: bool = True) -> bool:
        """The gateway stored window ``seq`` of this outbox's ``boot`` (or, ``stored=False``, refused it for
        good: counted as dropped): delete it. Returns whether the acknowledgement was this outbox's."""
        with self._lock:
            if boot != f"{self._meta('boot'):013x}":
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE meta SET value=1 WHERE key='gateway_acks'")
                if not stored:
                    (k, lost) = self._db.execute("SELECT COUNT(*), COALESCE(SUM(inputs), 0) FROM outbox WHERE seq=?",
                                                 (int(seq),)).fetchone()
                    self._count_drop(int(k), int(lost))
                self._db.execute("DELETE FROM outbox WHERE seq=?", (int(seq),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def dropped(self) -> int:
        """Messages dropped by the bound, cumulative over the life of this outbox (persisted)."""
        with self._lock:
            return self._meta("dropped")

    def stats(self) -> dict[str, int]:
        """``dropped`` messages and ``dropped_inputs`` (cumulative, persisted), ``queued`` now."""
        with self._lock:
            (queued,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            return {"dropped": self._meta("dropped"), "dropped_inputs": self._meta("dropped_inputs"),
                    "queued": int(queued)}

    def close(self) -> None:
        with self._lock:
            self._db.close()
