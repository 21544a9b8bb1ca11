"""One source of each default: the CLIs' flags read theirs from the dataclasses (or the one function) they fill.

For every flag below the CLI default must equal the dataclass default, and must *follow* it: the field's default
is changed here and the parser rebuilt, so a flag that spells its default again fails even while the two agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from pathlib import Path
from typing import Any, Callable

import pytest

from cloud_gateway.config import CollectionPolicy, GatewayConfig, WorkerConfig
from device_agent.agent import AgentConfig
from device_agent.drift import DriftConfig
from hw_bench.fleet import FleetJob, run_fleet
from hw_bench.fleet_sim import run_fleet_sim
from hw_bench.gateway_load import run_gateway_bench
from hw_bench.loadgen import Settings


def _agent() -> argparse.ArgumentParser:
    from device_agent.cli import build_parser

    return build_parser()


def _gateway() -> argparse.ArgumentParser:
    from cloud_gateway.cli import build_parser

    return build_parser()


def _bench() -> argparse.ArgumentParser:
    from hw_bench.cli import build_parser

    return build_parser()


# (parser, subcommand, flag dest, where the default lives: a dataclass or a function, its field or keyword)
FLAGS: list[tuple[Callable[[], argparse.ArgumentParser], str, str, Any, str]] = [
    *[(_agent, "run", dest, AgentConfig, name) for dest, name in (
        ("prefix", "prefix"), ("mqtt_version", "mqtt_version"), ("deadline", "deadline_s"),
        ("window", "telemetry_window_s"), ("state_dir", "state_dir"), ("outbox_max", "outbox_max_rows"),
        ("drop_policy", "drop_policy"), ("batch_size", "batch_size"), ("drift_offload", "drift_offload"),
        ("session_expiry", "session_expiry_s"))],
    (_agent, "run", "drift_window", DriftConfig, "window"),
    *[(_gateway, "serve", dest, WorkerConfig, name) for dest, name in (
        ("prefix", "prefix"), ("mqtt_version", "mqtt_version"), ("replica_id", "replica_id"),
        ("batch_size", "batch_size"), ("batch_ms", "batch_ms"), ("max_payload", "max_payload_bytes"),
        ("max_pending_per_device", "max_pending_per_device"), ("ingest_group", "ingest_group"),
        ("ingest_queue", "ingest_queue"), ("telemetry_retention_days", "telemetry_retention_days"))],
    *[(_gateway, "serve", dest, GatewayConfig, name) for dest, name in (
        ("db", "db"), ("bundles_dir", "bundles_dir"), ("http_host", "http_host"), ("http_port", "http_port"),
        ("teacher_format", "teacher_format"))],
    *[(_gateway, "serve", f"collect_{name}", CollectionPolicy, name)
      for name in ("rate", "max_per_device", "max_total", "retention_days")],
    (_gateway, "samples", "db", GatewayConfig, "db"),
    *[(_bench, cmd, dest, Settings, name) for cmd in ("run", "fleet") for dest, name in (
        ("scenario", "scenario"), ("duration", "min_duration_s"), ("min_queries", "min_queries"),
        ("warmup", "warmup"))],
    (_bench, "fleet", "deadline", run_fleet, "deadline_s"),
    *[(_bench, "gateway", name, run_gateway_bench, name) for name in ("clients", "inflight", "seconds", "replicas", "rounds")],
    *[(_bench, "fleet-sim", dest, run_fleet_sim, name) for dest, name in (
        ("devices", "devices"), ("period", "period_s"), ("seconds", "seconds"), ("connections", "connections"),
        ("broker_queue", "broker_queue"), ("drain", "drain_s"))],
]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _home_default(home: Any, name: str) -> Any:
    if dataclasses.is_dataclass(home):
        f = next(f for f in dataclasses.fields(home) if f.name == name)
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return home.__kwdefaults__[name]


def _as_flag(value: Any) -> Any:
    """A default as argparse holds it: enums by value (they are choices), the rest as is."""
    return value.value if isinstance(value, enum.Enum) else value


def _other(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, enum.Enum):
        return next(m for m in type(value) if m is not value)
    if isinstance(value, Path):
        return value / "elsewhere"
    if isinstance(value, str):
        return "3.1.1" if value == "5" else value + "-other"
    if isinstance(value, bool):
        return not value
    return value * 3 + 7


def _set_home_default(monkeypatch: pytest.MonkeyPatch, home: Any, name: str, value: Any) -> None:
    if dataclasses.is_dataclass(home):
        f = next(f for f in dataclasses.fields(home) if f.name == name)
        if f.default is not dataclasses.MISSING:
            monkeypatch.setattr(f, "default", value)
        else:
            monkeypatch.setattr(f, "default_factory", lambda: value)
    else:
        monkeypatch.setitem(home.__kwdefaults__, name, value)


def _cli_default(make: Callable[[], argparse.ArgumentParser], cmd: str, dest: str) -> Any:
    return _subparser(make(), cmd).get_default(dest)


@pytest.mark.parametrize("make,cmd,dest,home,name", FLAGS,
                         ids=[f"{m.__name__[1:]}-{c}-{d}" for m, c, d, _, _ in FLAGS])
def test_the_cli_default_is_the_dataclass_default_and_follows_it(monkeypatch, make, cmd, dest, home, name):
    want = _home_default(home, name)
    assert _cli_default(make, cmd, dest) == _as_flag(want), f"--{dest.replace('_', '-')} disagrees with {name}"
    changed = _other(want)
    _set_home_default(monkeypatch, home, name, changed)
    assert _cli_default(make, cmd, dest) == _as_flag(changed), (
        f"--{dest.replace('_', '-')} spells its default again instead of reading {getattr(home, '__name__', home)}"
        f".{name}")


def test_the_fleet_job_takes_the_local_settings_defaults():
    for job_field, settings_field in (("scenario", "scenario"), ("duration_s", "min_duration_s"),
                                      ("min_queries", "min_queries"), ("warmup", "warmup")):
        assert _home_default(FleetJob, job_field) == _home_default(Settings, settings_field)


def test_a_flag_that_spells_its_default_again_is_caught(monkeypatch):
    """The check above fails on a literal default: a parser with one is rebuilt after the field changed."""

    def literal() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        sub.add_parser("run").add_argument("--deadline", type=float, default=2.0)  # AgentConfig.deadline_s again
        return p

    assert _cli_default(literal, "run", "deadline") == _home_default(AgentConfig, "deadline_s")  # agrees today
    _set_home_default(monkeypatch, AgentConfig, "deadline_s", 9.5)
    assert _cli_default(literal, "run", "deadline") != 9.5  # and no longer once the dataclass moves on


def test_help_shows_the_defaults_of_rollout_and_serve():
    from cloud_gateway.cli import build_parser

    rollout = " ".join(_subparser(build_parser(), "rollout").format_help().split())
    assert "(default: 60.0)" in rollout and "offload_rate <= baseline * 1.25)" in rollout
    serve = " ".join(_subparser(build_parser(), "serve").format_help().split())
    assert "(default: gw-0)" in serve and "(default: fleet)" in serve
