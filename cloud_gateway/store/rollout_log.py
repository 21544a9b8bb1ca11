"""The ``rollouts`` and ``rollout_steps`` tables: every rollout and every step it took (`cloud_gateway.rollout`
drives them; a restart resumes from what is recorded here)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    insert,
    select,
    update,
)

from .database import Database, meta

rollouts = Table(
    "rollouts", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bundle", String(128), nullable=False), Column("state", String(32), nullable=False),
    Column("created", Float, nullable=False), Column("updated", Float, nullable=False),
    Column("plan", JSON, nullable=False), Column("baseline", JSON), Column("result", JSON),
)
rollout_steps = Table(
    "rollout_steps", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("step", String(64), nullable=False), Column("detail", JSON),
    Index("ix_rollout_steps_rollout_id", "rollout_id", "id"),
)

ACTIVE_ROLLOUT_STATES = ("updating", "watching", "awaiting_approval", "promoting", "rolling_back")


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def create(self, bundle: str, plan: dict[str, Any], baseline: dict[str, Any] | None) -> int:
        now = time.time()
        with self.engine.begin() as c:
            rid = c.execute(insert(rollouts).values(bundle=bundle, state="updating", created=now, updated=now,
                                                    plan=plan, baseline=baseline)).inserted_primary_key[0]
        return int(rid)

    def update(self, rollout_id: int, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(updated=time.time(), **values))

    def add_step(self, rollout_id: int, step: str, detail: dict[str, Any] | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(insert(rollout_steps).values(rollout_id=rollout_id, time=time.time(), step=step, detail=detail))

    def has_step(self, rollout_id: int, step: str) -> bool:
        """Whether ``step`` was recorded for the rollout (an abort another replica was asked for)."""
        with self.engine.connect() as c:
            return c.execute(select(rollout_steps.c.id).where(rollout_steps.c.rollout_id == rollout_id,
                                                              rollout_steps.c.step == step).limit(1)).first() is not None

    def all(self, *, active: bool = False) -> list[dict[str, Any]]:
        q = select(rollouts).order_by(rollouts.c.id)
        if active:
            q = q.where(rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES))
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def get(self, rollout_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
            if r is None:
                return None
            steps = c.execute(select(rollout_steps).where(rollout_steps.c.rollout_id == rollout_id)
                              .order_by(rollout_steps.c.id)).mappings().all()
        return {**dict(r), "steps": [{k: v for k, v in dict(s).items() if k != "rollout_id"} for s in steps]}
