"""The agent's command handler: one registered function per command.

Commands arrive as JSON on ``<prefix>/<id>/cmd``. Built-ins (``set_threshold``,
``update_bundle``) are registered here; commands from packages above the agent
(``bench`` from hw_bench) register under the entry-point group
``edge_toolchain.agent_commands`` (``name = "module:function"``), so the agent
never imports them by name. A handler is ``fn(agent, cmd) -> None`` and raises
to fail; the outcome goes into the agent's retained status.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, Mapping

from edgecore.errors import AgentError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edge_toolchain.agent_commands"
CommandFn = Callable[["Agent", dict[str, Any]], None]


def set_threshold(agent: "Agent", cmd: dict[str, Any]) -> None:
    agent.set_threshold(cmd.get("threshold"))  # type: ignore[arg-type]


def update_bundle(agent: "Agent", cmd: dict[str, Any]) -> None:
    """Fetch (URL under the configured gateway bases), verify, load and smoke-test, then switch."""
    url = cmd.get("url")
    if not isinstance(url, str):
        raise AgentError("update_bundle needs a 'url'")
    sha = cmd.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise AgentError("update_bundle: 'sha256' must be a string")
    allow = cmd.get("allow_line_change", False)
    if not isinstance(allow, bool):
        raise AgentError("update_bundle: 'allow_line_change' must be true or false")
    rollback = cmd.get("rollback", False)
    if not isinstance(rollback, bool):
        raise AgentError("update_bundle: 'rollback' must be true or false")
    agent.update_from(url, sha256=sha, allow_line_change=allow, rollback=rollback)


BUILTINS: dict[str, CommandFn] = {"set_threshold": set_threshold, "update_bundle": update_bundle}


def entry_point_commands() -> dict[str, CommandFn]:
    """Commands registered by installed packages; a broken one is logged and left out."""
    found: dict[str, CommandFn] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as e:  # a missing optional package must not stop the agent
            log.warning("agent command %r (%s) cannot be loaded: %s", ep.name, ep.value, e)
    return found


class CommandRegistry:
    """name -> handler; built-ins, then entry points, then ``extra`` (which wins: tests and embedders)."""

    def __init__(self, extra: Mapping[str, CommandFn] | None = None, *, discover: bool = True) -> None:
        self._fns: dict[str, CommandFn] = dict(BUILTINS)
        self._discover = discover
        self._extra = dict(extra or {})
        self._fns.update(self._extra)

    def _load(self) -> None:
        if self._discover:
            self._discover = False
            self._fns.update({**entry_point_commands(), **BUILTINS, **self._extra})

    def register(self, name: str, fn: CommandFn) -> None:
        self._extra[name] = fn
        self._fns[name] = fn

    def names(self) -> list[str]:
        self._load()
        return sorted(self._fns)

    def get(self, name: object) -> CommandFn:
        self._load()
        fn = self._fns.get(name) if isinstance(name, str) else None
        if fn is None:
            raise AgentError(f"unknown command {name!r} ({', '.join(self.names())})")
        return fn
