"""The ``policy`` and ``proposals`` tables: the refresh policy document and the refreshes it proposed
(`cloud_gateway.policy` evaluates them)."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Float,
    Integer,
    String,
    Table,
    insert,
    select,
    update,
)

from .database import Database, meta

policy_table = Table(
    "policy", meta,
    Column("id", Integer, primary_key=True), Column("doc", JSON, nullable=False), Column("updated", Float, nullable=False),
)
proposals = Table(
    "proposals", meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created", Float, nullable=False), Column("updated", Float, nullable=False),
    Column("state", String(32), nullable=False), Column("reason", JSON, nullable=False), Column("result", JSON),
)


class PolicyStore:
    def __init__(self, db: Database) -> None:
        self.engine = db.engine

    def get(self) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(select(policy_table.c.doc).where(policy_table.c.id == 1)).first()
        return None if r is None else (r[0] if isinstance(r[0], dict) else json.loads(r[0]))

    def set(self, doc: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            if c.execute(update(policy_table).where(policy_table.c.id == 1).values(doc=doc, updated=time.time())).rowcount == 0:
                c.execute(insert(policy_table).values(id=1, doc=doc, updated=time.time()))

    def add_proposal(self, reason: dict[str, Any], state: str = "proposed") -> int:
        now = time.time()
        with self.engine.begin() as c:
            return int(c.execute(insert(proposals).values(created=now, updated=now, state=state, reason=reason))
                       .inserted_primary_key[0])

    def set_proposal(self, pid: int, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(proposals).where(proposals.c.id == pid).values(updated=time.time(), **values))

    def proposals(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(select(proposals).order_by(proposals.c.id)).mappings()]
