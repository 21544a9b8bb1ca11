"""The ``samples`` table: collected samples and their human labels (`cloud_gateway.collection` decides what to
collect; this stores it)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)

from .database import Database, meta

samples = Table(
    "samples", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("bundle", String(128), nullable=False, server_default=""),
    Column("received", Float, nullable=False),
    Column("input", LargeBinary, nullable=False),
    Column("teacher_probs", LargeBinary, nullable=False),
    Column("teacher_label", Integer, nullable=False),
    Column("uncertainty", Float, nullable=False),
    Column("confidence", Float), Column("drift", Boolean),
    Column("flagged", Boolean, nullable=False, server_default=false()),
    Column("human_label", Integer), Column("labelled_at", Float),
    # a person's answer where it is not one class (a detection frame: the teacher's boxes they accepted), JSON
    Column("human_answer", JSON),
    Index("ix_samples_device_id_id", "device_id", "id"),
    Index("ix_samples_queue", "human_label", "uncertainty"),
)

# a person labelled it: a class (``human_label``) or the boxes kept of a detection frame (``human_answer``)
_LABELLED = or_(samples.c.human_label.is_not(None), samples.c.human_answer.is_not(None))


class SampleStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def add(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.engine.begin() as c:
                c.execute(insert(samples), rows)

    def trim(self, *, max_per_device: int, max_total: int, older_than: float | None) -> int:
        """Enforce the bounds: retention, then per device, then in total. Returns rows deleted.

        One device's volume never crowds out another's: past ``max_per_device`` a device loses its own oldest
        samples, and past ``max_total`` only the devices holding more than a fair share lose theirs, down to
        the largest level that fits (`fair_cuts`): a device under that level keeps every sample. Within a
        device the oldest unlabelled samples go first; a human-labelled one goes only for that device's own
        labelled volume, never for another device's.
        """
        n = 0
        with self.engine.begin() as c:
            if older_than is not None:
                n += c.execute(delete(samples).where(samples.c.received < older_than)).rowcount
            counts = self._counts(c)
            for device_id, (total, _) in counts.items():
                if total > max_per_device:
                    n += self._drop_oldest(c, device_id, total - max_per_device)
            counts = self._counts(c)
            unlabelled = {d: t - lab for d, (t, lab) in counts.items()}
            labelled = {d: lab for d, (t, lab) in counts.items()}
            room = max_total - sum(labelled.values())  # what the unlabelled samples may fill
            if room < 0:  # the labels alone are past the bound: no unlabelled one fits, the most labelled give
                cuts = fair_cuts(labelled, max_total)
                for device_id in counts:
                    n += self._drop_oldest(c, device_id, unlabelled[device_id] + cuts.get(device_id, 0))
            elif sum(unlabelled.values()) > room:
                for device_id, k in fair_cuts(unlabelled, room).items():
                    n += self._drop_oldest(c, device_id, k)
        return n

    @staticmethod
    def _counts(c: Connection) -> dict[str, tuple[int, int]]:
        """``{device: (samples, labelled)}``."""
        rows = c.execute(select(samples.c.device_id, func.count(), func.sum(case((_LABELLED, 1), else_=0)))
                         .group_by(samples.c.device_id)).all()
        return {d: (int(t), int(lab or 0)) for d, t, lab in rows}

    @staticmethod
    def _drop_oldest(c: Connection, device_id: str, k: int) -> int:
        """Delete ``k`` of the device's samples: its oldest unlabelled ones first, then its oldest labelled."""
        if k <= 0:
            return 0
        q = (select(samples.c.id).where(samples.c.device_id == device_id)
             .order_by(case((_LABELLED, 1), else_=0), samples.c.id).limit(k))
        ids = [r[0] for r in c.execute(q)]
        return c.execute(delete(samples).where(samples.c.id.in_(ids))).rowcount if ids else 0

    def rows(self, *, after: int = 0, limit: int = 100, device: str | None = None,
             queue: float | None = None, newest: bool = False,
             devices: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows in id order after ``after``; ``queue``: only unlabelled ones at least that uncertain, most first;
        ``newest``: the latest ``limit`` rows, newest first; ``devices``: only those devices' rows."""
        q = select(samples)
        if device is not None:
            q = q.where(samples.c.device_id == device)
        if devices is not None:
            q = q.where(samples.c.device_id.in_(devices))
        if newest:
            q = q.order_by(samples.c.id.desc())
        elif queue is not None:
            q = q.where(samples.c.human_label.is_(None), samples.c.human_answer.is_(None),
                        samples.c.uncertainty >= queue)
            q = q.order_by(samples.c.uncertainty.desc(), samples.c.id)
        else:
            q = q.where(samples.c.id > after).order_by(samples.c.id)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q.limit(limit)).mappings()]

    def label(self, sample_id: int, label: int) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(update(samples).where(samples.c.id == sample_id)
                                  .values(human_label=label, labelled_at=time.time())).rowcount)

    def label_answer(self, sample_id: int, answer: dict[str, Any]) -> bool:
        """A person's answer for a sample whose answer is not one class (`edgecore.samples.Sample.human_answer`)."""
        with self.engine.begin() as c:
            return bool(c.execute(update(samples).where(samples.c.id == sample_id)
                                  .values(human_answer=answer, labelled_at=time.time())).rowcount)

    def get(self, sample_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(select(samples).where(samples.c.id == sample_id)).mappings().first()
        return dict(row) if row is not None else None

    def delete(self, device: str) -> int:
        with self.engine.begin() as c:
            return int(c.execute(delete(samples).where(samples.c.device_id == device)).rowcount)

    def stats(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(select(samples.c.device_id, func.count(), func.count(samples.c.labelled_at),
                                    func.min(samples.c.received), func.max(samples.c.received))
                             .group_by(samples.c.device_id).order_by(samples.c.device_id)).all()
        return [{"device": d, "samples": int(n), "labelled": int(lab), "oldest": lo, "newest": hi}
                for d, n, lab, lo, hi in rows]


def fair_cuts(counts: dict[str, int], capacity: int) -> dict[str, int]:
    """How many each device gives up so that ``counts`` fit ``capacity``, fairly (max-min fairness).

    The level L is the largest with ``sum(min(count, L)) <= capacity``; each device above it is cut to L
    (a remainder goes one by one to the largest devices, so the sum fits exactly). A device at or under L
    loses nothing, however much the others hold.
    """
    if sum(counts.values()) <= capacity:
        return {}
    capacity = max(0, capacity)
    sizes = sorted(counts.values())
    level, left, n = 0, capacity, len(sizes)
    for i, size in enumerate(sizes):  # fill the small ones whole while the rest can have as much
        if size * (n - i) <= left:
            left -= size
            level = size
        else:
            level = left // (n - i)
            break
    keep = {d: min(v, level) for d, v in counts.items()}
    spare = capacity - sum(keep.values())
    for d in sorted(counts, key=lambda d: (-counts[d], d)):
        if spare <= 0:
            break
        if counts[d] > keep[d]:
            keep[d] += 1
            spare -= 1
    return {d: counts[d] - keep[d] for d in counts if counts[d] > keep[d]}
