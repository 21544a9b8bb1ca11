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
    delete,
    false,
    func,
    insert,
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


class SampleStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def add(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.engine.begin() as c:
                c.execute(insert(samples), rows)

    def trim(self, *, max_per_device: int, max_total: int, older_than: float | None) -> int:
        """Enforce the bounds, oldest out: retention, then per device, then in total. Returns rows deleted."""
        n = 0
        with self.engine.begin() as c:
            if older_than is not None:
                n += c.execute(delete(samples).where(samples.c.received < older_than)).rowcount
            counts = c.execute(select(samples.c.device_id, func.count()).group_by(samples.c.device_id)).all()
            for device_id, count in counts:
                if count > max_per_device:
                    n += self._drop_oldest(c, count - max_per_device, samples.c.device_id == device_id)
            total = c.execute(select(func.count()).select_from(samples)).scalar_one()
            if total > max_total:
                n += self._drop_oldest(c, total - max_total, None)
        return n

    @staticmethod
    def _drop_oldest(c: Connection, k: int, where: Any) -> int:
        q = select(samples.c.id).order_by(samples.c.id).limit(k)
        if where is not None:
            q = q.where(where)
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
