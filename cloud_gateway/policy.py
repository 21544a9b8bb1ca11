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
     "cooldown_minutes": 60,
     "min_devices": 2, "min_share": 0.0,        # a quorum: a trigger needs this many distinct devices of the line
                                                 # (and this share of it), at most the line's size
     "max_proposals_per_day": 6}                 # a rate limit per line, beside the cooldown

One device cannot drive it: every trigger needs the quorum of distinct devices (a line of one device is its own
quorum), the default action only proposes (a person approves), proposals are rate-limited per line, and a
refresh's rollout never has the devices that triggered it as its only canaries (another device of the line is
added, drawn at random; with none, only a person's approval lets it go on).

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
import math
import random
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
                            "cooldown_minutes": 60.0, "min_devices": 2, "min_share": 0.0,
                            "max_proposals_per_day": 6}


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
    num("min_devices", 1)
    num("max_proposals_per_day", 1)
    if isinstance(p["min_share"], bool) or not isinstance(p["min_share"], (int, float)) or not 0 <= p["min_share"] <= 1:
        raise GatewayError(f"policy.min_share: expected a share in [0, 1], got {p['min_share']!r}")
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
    return {line: [d["device_id"] for d in rows] for line, rows in _line_rows(store).items()}


def _line_rows(store: GatewayStore) -> dict[str | None, list[dict[str, Any]]]:
    from .rollout import device_line

    out: dict[str | None, list[dict[str, Any]]] = {}
    for d in store.devices.all():
        out.setdefault(device_line(d), []).append(d)
    return out


def triggers(store: GatewayStore, p: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Which triggers fire now, per model line, each with its line, devices and numbers."""
    fired: list[dict[str, Any]] = []
    for line, rows in sorted(_line_rows(store).items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        fired += [{"line": line, **f, "why": f"model line {line or '(none reported)'}: {f['why']}"}
                  for f in _line_triggers(store, p, now, rows)]
    return fired


def _could(row: dict[str, Any], fires: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether a device's windows might fire a trigger that needs *every* recent window with inputs to: its
    last window (kept on its row) already rules it out when it had inputs and does not fire. Most devices of a
    healthy fleet are ruled out so, and their windows are never read (one query per device each round was
    10.8 s at 5,000 devices)."""
    last = row.get("last_telemetry")
    return not (isinstance(last, dict) and _busy([last]) and not fires(last))


def quorum(p: dict[str, Any], line_size: int) -> int:
    """Distinct devices a trigger needs in a line of ``line_size``: ``min_devices`` and ``min_share`` of it, at
    most the line itself (a line of one device is its own quorum)."""
    return max(1, min(line_size, max(int(p["min_devices"]), math.ceil(float(p["min_share"]) * line_size))))


def _line_triggers(store: GatewayStore, p: dict[str, Any], now: float,
                   rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fired: list[dict[str, Any]] = []
    need = quorum(p, len(rows))
    n = p["drift_windows"]
    if n:
        hit = {}
        for d in [r["device_id"] for r in rows if _could(r, lambda w: bool((w.get("drift") or {}).get("flag")))]:
            ws = _busy(store.telemetry.history(d, limit=max(50, 4 * int(n))))[-int(n):]
            if len(ws) >= n and all((w.get("drift") or {}).get("flag") for w in ws):
                hit[d] = len(ws)
        if len(hit) >= need:
            fired.append({"trigger": "drift", "devices": sorted(hit), "quorum": need,
                          "why": f"drift flagged on the last {int(n)} windows with inputs of {', '.join(sorted(hit))} "
                                 f"({len(hit)} of the {need} devices the quorum needs)"})
    if p["offload_rate"] is not None:
        since = now - 60.0 * float(p["offload_minutes"])
        hit = {}
        limit = float(p["offload_rate"])
        for d in [r["device_id"] for r in rows if _could(r, lambda w: float(w.get("offload_rate") or 0) > limit)]:
            ws = _busy(store.telemetry.since(d, since))
            if ws and all(float(w.get("offload_rate") or 0) > p["offload_rate"] for w in ws):
                hit[d] = round(sum(float(w["offload_rate"]) for w in ws) / len(ws), 3)
        if len(hit) >= max(int(p["offload_devices"]), need):
            fired.append({"trigger": "offload", "devices": sorted(hit), "offload_rates": hit, "quorum": need,
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
        self._stop.clear()  # (started again when this replica becomes the leader again)
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
        props = [x for x in self.store.policy.proposals() if isinstance(x["reason"], dict)]
        cooling = {x["reason"].get("line") for x in props
                   if now - float(x["created"]) < 60.0 * float(p["cooldown_minutes"])}
        day: dict[Any, int] = {}
        for x in props:
            if now - float(x["created"]) < 86400.0:
                day[x["reason"].get("line")] = day.get(x["reason"].get("line"), 0) + 1
        by_line: dict[str | None, list[dict[str, Any]]] = {}
        for f in triggers(self.store, p, now):
            if f["line"] in cooling:
                continue
            if day.get(f["line"], 0) >= int(p["max_proposals_per_day"]):
                log.warning("policy fired for model line %s but its %d proposals in 24 h reach "
                            "max_proposals_per_day; not proposing again", f["line"], day[f["line"]])
                continue
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
        approved = prop["state"] == "approved"  # a person approved it (action "run" runs without one)
        triggered = sorted({d for f in prop["reason"].get("fired") or [] for d in f.get("devices") or []})
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
            canary = self._canary(ro["canary"], triggered, line, pid, approved)
            rid = self.start_rollout(bundle=stored, canary=canary, watch_s=float(ro["watch_s"]),
                                     promote_if=str(ro["promote_if"]))
        except (GatewayError, OSError, tarfile.TarError) as e:
            self.store.policy.set_proposal(pid, state="failed",
                                           result={"command": argv, "bundle": str(tar), "error": str(e)})
            return
        self.store.policy.set_proposal(pid, state="rolling_out",
                                       result={"command": argv, "bundle": stored, "rollout": rid})

    def _canary(self, spec: Any, triggered: list[str], line: str | None, pid: int, approved: bool) -> Any:
        """The rollout's canaries, never only the devices that triggered the refresh: a device reporting what it
        likes must not be the one witness of the bundle made for it. Named canaries that are all triggering devices
        get another device of the line, drawn at random (seeded by the proposal); with none to add, only a
        person's approval lets the rollout go on."""
        if not isinstance(spec, str) or spec.strip().endswith("%"):
            return spec  # a share of the fleet: drawn at random by the rollout itself
        named = [d.strip() for d in spec.split(",") if d.strip()]
        if not triggered or not set(named) <= set(triggered):
            return named
        others = sorted(set(lines(self.store).get(line, [])) - set(triggered))
        if others:
            return [*named, random.Random(pid).choice(others)]
        if approved:
            log.warning("proposal %d: the only canaries are the devices that triggered it (%s); a person approved it",
                        pid, ", ".join(named))
            return named
        raise GatewayError(f"the only canaries would be the devices that triggered the refresh ({', '.join(named)}) "
                           f"and model line {line} has no other: approve the proposal to go on")
