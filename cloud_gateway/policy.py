"""When to refresh: a policy over the fleet's telemetry that proposes (or runs) a refresh and then a rollout.

The policy (``cloud-gateway policy set FILE``, ``PUT /api/policy``) is a JSON document::

    {"drift_windows": 5,                        # a device flagged drift on its last 5 windows with inputs
     "offload_rate": 0.3, "offload_minutes": 10, "offload_devices": 2,   # or: >= 2 devices offloaded more
                                                 # than 30% in every window of the last 10 minutes
     "action": "propose",                        # "propose" (default): record it, a person approves it;
                                                 # "run": run the refresh command, then roll out its bundle
     "refresh_command": ["toolchain", "refresh", "--from", "{gateway}", "--run", "runs/prod",
                         "--out", "runs/refresh-{id}", "--device", "{device}", "--json"],
     "rollout": {"canary": "{device}", "watch_s": 120, "promote_if": "rollbacks == 0 and offload_rate <= baseline"},
     "cooldown_minutes": 60}

The gateway evaluates it every ``interval_s``, per model line (the manifest's
``model.name`` each device reports: two models' devices never add up to one
trigger, nor share a refresh): when a trigger fires for a line (and that line has
no proposal younger than the cooldown) it records a proposal naming the line,
with the reason (which trigger, which devices, the numbers), and logs it.
Approving one (``cloud-gateway policy approve ID``) or ``action = "run"`` runs
the refresh command as a subprocess (the gateway never imports the toolchain;
``{gateway}``, ``{device}``, ``{line}`` and ``{id}`` are filled in), reads the
new bundle from the JSON report it prints last (``bundles``), checks that it is
of the proposal's line, uploads it to the gateway's store and starts a rollout
with the policy's settings (which reaches that line only). Every outcome is on
the proposal.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edgecore.errors import GatewayError

from .store import GatewayStore

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"drift_windows": 5, "offload_rate": None, "offload_minutes": 10, "offload_devices": 1,
                            "action": "propose", "refresh_command": None,
                            "rollout": {"canary": "{device}", "watch_s": 120.0,
                                        "promote_if": "rollbacks == 0 and offload_rate <= baseline"},
                            "cooldown_minutes": 60.0}


def check_policy(doc: Any) -> dict[str, Any]:
    """The policy with defaults filled in; a GatewayError naming the first bad field."""
    if not isinstance(doc, dict):
        raise GatewayError("policy: expected a JSON object")
    unknown = set(doc) - set(DEFAULTS)
    if unknown:
        raise GatewayError(f"policy: unknown field(s) {sorted(unknown)} (known: {', '.join(DEFAULTS)})")
    p = {**DEFAULTS, **doc}

    def num(key: str, lo: float, *, null: bool = False) -> None:
        v = p[key]
        if v is None and null:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
            raise GatewayError(f"policy.{key}: expected a number >= {lo}, got {v!r}")

    num("drift_windows", 0, null=True)
    num("offload_rate", 0, null=True)
    num("offload_minutes", 0)
    num("offload_devices", 1)
    num("cooldown_minutes", 0)
    if p["action"] not in ("propose", "run"):
        raise GatewayError(f"policy.action: 'propose' or 'run', got {p['action']!r}")
    cmd = p["refresh_command"]
    if cmd is not None and (not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd) or not cmd):
        raise GatewayError("policy.refresh_command: a list of strings (argv), e.g. [\"toolchain\", \"refresh\", ...]")
    if p["action"] == "run" and cmd is None:
        raise GatewayError("policy.action = 'run' needs policy.refresh_command")
    if not isinstance(p["rollout"], dict):
        raise GatewayError("policy.rollout: expected an object {canary, watch_s, promote_if}")
    p["rollout"] = {**DEFAULTS["rollout"], **p["rollout"]}
    from .rollout import parse_condition

    parse_condition(str(p["rollout"]["promote_if"]))
    return p


def _busy(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in windows if ((w.get("counts") or {}).get("inputs") or 0) > 0]


def lines(store: GatewayStore) -> dict[str | None, list[str]]:
    """The known devices by model line (None: a device that reported none yet)."""
    from .rollout import device_line

    out: dict[str | None, list[str]] = {}
    for d in store.devices.all():
        out.setdefault(device_line(d), []).append(d["device_id"])
    return out


def triggers(store: GatewayStore, p: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Which triggers fire now, per model line, each with its line, devices and numbers."""
    fired: list[dict[str, Any]] = []
    for line, devices in sorted(lines(store).items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        fired += [{"line": line, **f, "why": f"model line {line or '(none reported)'}: {f['why']}"}
                  for f in _line_triggers(store, p, now, devices)]
    return fired


def _line_triggers(store: GatewayStore, p: dict[str, Any], now: float, devices: list[str]) -> list[dict[str, Any]]:
    fired: list[dict[str, Any]] = []
    n = p["drift_windows"]
    if n:
        hit = {}
        for d in devices:
            ws = _busy(store.telemetry.history(d, limit=max(50, 4 * int(n))))[-int(n):]
            if len(ws) >= n and all((w.get("drift") or {}).get("flag") for w in ws):
                hit[d] = len(ws)
        if hit:
            fired.append({"trigger": "drift", "devices": sorted(hit),
                          "why": f"drift flagged on the last {int(n)} windows with inputs of {', '.join(sorted(hit))}"})
    if p["offload_rate"] is not None:
        since = now - 60.0 * float(p["offload_minutes"])
        hit = {}
        for d in devices:
            ws = _busy(store.telemetry.since(d, since))
            if ws and all(float(w.get("offload_rate") or 0) > p["offload_rate"] for w in ws):
                hit[d] = round(sum(float(w["offload_rate"]) for w in ws) / len(ws), 3)
        if len(hit) >= p["offload_devices"]:
            fired.append({"trigger": "offload", "devices": sorted(hit), "offload_rates": hit,
                          "why": f"{len(hit)} device(s) offloaded more than {p['offload_rate']:.0%} in every window "
                                 f"of the last {p['offload_minutes']:g} min: {hit}"})
    return fired


class PolicyEngine:
    """Evaluates the stored policy every ``interval_s``; records proposals; runs approved ones."""

    def __init__(self, *, store: GatewayStore, gateway_url: Callable[[], str], start_rollout: Callable[..., int],
                 upload: Callable[[str, Path], None], interval_s: float = 30.0) -> None:
        self.store, self.gateway_url, self.start_rollout, self.upload = store, gateway_url, start_rollout, upload
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PolicyEngine":
        self._thread = threading.Thread(target=self._loop, name="policy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.evaluate()
            except Exception:  # the database away, a bad stored policy: logged, tried again next round
                log.exception("policy evaluation failed")

    def evaluate(self, now: float | None = None) -> int | None:
        """One round: one proposal per model line whose trigger fired (and whose cooldown allows); the first
        new proposal's id, else None."""
        doc = self.store.policy.get()
        if doc is None:
            return None
        p = check_policy(doc)
        now = time.time() if now is None else now
        cooling = {x["reason"].get("line") for x in self.store.policy.proposals()
                   if now - float(x["created"]) < 60.0 * float(p["cooldown_minutes"]) and isinstance(x["reason"], dict)}
        by_line: dict[str | None, list[dict[str, Any]]] = {}
        for f in triggers(self.store, p, now):
            if f["line"] not in cooling:
                by_line.setdefault(f["line"], []).append(f)
        first: int | None = None
        for line, fired in by_line.items():
            reason = {"line": line, "fired": fired, "policy": p, "device": fired[0]["devices"][0]}
            pid = self.store.policy.add_proposal(reason)
            log.warning("policy fired (proposal %d): %s", pid, "; ".join(f["why"] for f in fired))
            if p["action"] == "run":
                threading.Thread(target=self.run, args=(pid,), name=f"policy-run-{pid}", daemon=True).start()
            first = pid if first is None else first
        return first

    def approve(self, pid: int) -> None:
        prop = next((x for x in self.store.policy.proposals() if int(x["id"]) == pid), None)
        if prop is None or prop["state"] != "proposed":
            raise GatewayError(f"proposal {pid} is not waiting for approval")
        self.store.policy.set_proposal(pid, state="approved")
        threading.Thread(target=self.run, args=(pid,), name=f"policy-run-{pid}", daemon=True).start()

    def run(self, pid: int) -> None:
        """Run the refresh command, upload its bundle, start the rollout; every outcome on the proposal."""
        prop = next(x for x in self.store.policy.proposals() if int(x["id"]) == pid)
        p, device, line = prop["reason"]["policy"], prop["reason"]["device"], prop["reason"].get("line")
        fill = {"gateway": self.gateway_url(), "device": device, "line": line or "", "id": str(pid)}
        if not p["refresh_command"]:
            self.store.policy.set_proposal(pid, state="failed", result={"error": "policy.refresh_command is not set"})
            return
        argv = [a.format(**fill) for a in p["refresh_command"]]
        self.store.policy.set_proposal(pid, state="refreshing", result={"command": argv})
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=6 * 3600)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.store.policy.set_proposal(pid, state="failed", result={"command": argv, "error": str(e)})
            return
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.store.policy.set_proposal(pid, state="failed", result={"command": argv, "error": err})
            return
        try:
            report = json.loads(r.stdout.strip().splitlines()[-1])
            name, path = next(iter(report["bundles"].items()))
        except (ValueError, KeyError, IndexError, StopIteration, AttributeError) as e:
            self.store.policy.set_proposal(pid, state="failed", result={"command": argv, "error":
                                    f"the refresh command printed no JSON report with 'bundles' ({e})"})
            return
        tar = Path(str(path) + ".tar.gz") if not str(path).endswith(".tar.gz") else Path(path)
        stored = f"policy-{pid}-{name}"
        try:
            from .rollout import line_of

            made = line_of(tar) if tar.is_file() else line
            if line is not None and made != line:
                raise GatewayError(f"the refresh made a bundle of model line {made}, the proposal is for line {line}")
            self.upload(stored, tar)
            ro = {k: (v.format(**fill) if isinstance(v, str) else v) for k, v in p["rollout"].items()}
            rid = self.start_rollout(bundle=stored, canary=ro["canary"], watch_s=float(ro["watch_s"]),
                                     promote_if=str(ro["promote_if"]))
        except (GatewayError, OSError, tarfile.TarError) as e:
            self.store.policy.set_proposal(pid, state="failed",
                                           result={"command": argv, "bundle": str(tar), "error": str(e)})
            return
        self.store.policy.set_proposal(pid, state="rolling_out",
                                       result={"command": argv, "bundle": stored, "rollout": rid})
