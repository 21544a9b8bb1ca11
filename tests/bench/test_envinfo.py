"""envinfo: the steal meter (how much CPU time a hypervisor took while a benchmark ran) and its warning; the load
average every record carries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hw_bench import envinfo
from hw_bench.envinfo import STEAL_WARN_PCT, StealMeter, load_average, steal_note


def _stat(path: Path, user: int, idle: int, steal: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice, then a per-core line
    path.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n")


def test_steal_share_is_the_stolen_part_of_the_ticks_between_start_and_share(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, user=1000, idle=5000, steal=100)
    meter = StealMeter(str(stat))
    _stat(stat, user=1600, idle=5100, steal=400)  # +600 user, +100 idle, +300 steal: 300 / 1000
    assert meter.share() == 30.0
    assert "30% of this machine's CPU time" in steal_note(meter.share())
    _stat(stat, user=1000, idle=5000, steal=100)  # no time passed since the start
    assert meter.share() is None


def test_no_steal_counter_means_none_and_no_note(tmp_path: Path) -> None:
    assert StealMeter(str(tmp_path / "absent")).share() is None
    bad = tmp_path / "stat"
    bad.write_text("intr 1 2 3\n")
    assert StealMeter(str(bad)).share() is None
    assert steal_note(None) is None and steal_note(STEAL_WARN_PCT - 0.1) is None
    assert steal_note(STEAL_WARN_PCT) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_this_machine_has_a_steal_counter() -> None:
    import time

    meter = StealMeter()
    end = time.monotonic() + 0.1
    while time.monotonic() < end:  # busy for several clock ticks (10 ms each)
        pass
    share = meter.share()
    assert share is not None and 0.0 <= share <= 100.0


def test_load_average_is_three_rounded_numbers_or_none_where_the_platform_has_none(monkeypatch) -> None:
    monkeypatch.setattr(envinfo.os, "getloadavg", lambda: (0.123, 1.0, 2.5551))
    assert load_average() == [0.12, 1.0, 2.56]
    assert envinfo.environment()["load_avg"] == [0.12, 1.0, 2.56]

    def absent() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(envinfo.os, "getloadavg", absent)
    assert load_average() is None and envinfo.environment()["load_avg"] is None
