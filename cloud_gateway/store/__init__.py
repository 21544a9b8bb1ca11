"""The gateway's store: one database (`database.Database`), one small store per table.

| attribute | module | table(s) |
|---|---|---|
| `devices` | `devices` | ``devices``: each device's last status and window |
| `telemetry` | `telemetry_windows` | ``telemetry``: the windows, exactly once |
| `samples` | `collected_samples` | ``samples``: collected samples and human labels |
| `rollouts` | `rollout_log` | ``rollouts``, ``rollout_steps`` |
| `policy` | `refresh_policy` | ``policy``, ``proposals`` |

Every table is on `meta` once this package is imported (the migrations compare against it).
"""

from __future__ import annotations

from pathlib import Path

from .collected_samples import SampleStore
from .database import Database, meta
from .devices import DeviceStore
from .refresh_policy import PolicyStore
from .rollout_log import RolloutStore
from .telemetry_windows import WindowStore

__all__ = ["GatewayStore", "meta"]


class GatewayStore:
    """Opens (and migrates) the database once; callers use the per-table stores."""

    def __init__(self, url: str | Path) -> None:
        self.db = Database(url)
        self.devices = DeviceStore(self.db)
        self.telemetry = WindowStore(self.db, self.devices)
        self.samples = SampleStore(self.db)
        self.rollouts = RolloutStore(self.db)
        self.policy = PolicyStore(self.db)
