"""Staged rollout: canaries first, watched against their own baseline, then the fleet, or back automatically.

A rollout (``POST /api/rollouts``, ``cloud-gateway rollout start``) names a
bundle already in the gateway's store (uploaded, so signed by a trusted key and
verified), the canary devices (ids, or a percentage of the fleet), a watch
window and a ``--promote-if`` condition. Its fleet is the devices of the
bundle's model line (the manifest's ``model.name``, which each device reports)
on the bundle's target; the others are left alone and counted in the plan's
``excluded``. Naming another ``line`` moves that line's devices to the bundle's
(an explicit, logged switch: the commands carry ``allow_line_change``, without
which a device refuses a bundle of another line). The gateway drives it:

``updating``   send ``update_bundle`` to the canaries; wait until each one's
               retained status reports the new manifest (a canary that refuses
               it or fails to load it never does: the rollout rolls back the
               others and ends ``failed``, the refusing devices listed);
``watching``   wait ``watch_s`` seconds, then aggregate the canaries' telemetry
               windows from that time on and evaluate the condition against the
               baseline (the same metrics over the windows before the rollout);
               at least ``min_reports`` distinct canaries must have reported.
               What devices report can only stop a rollout: when it holds, the
               gateway evaluates the bundle *itself* (`cloud_gateway.evaluate`:
               the candidate against the bundle it replaces, on the gateway's
               runtime, on the teacher run's test split and the collected inputs
               with a person's or the teacher's labels), and only a pass promotes;
``awaiting_approval`` the gateway holds no inputs to judge the bundle on (or
               cannot run its target): a person approves (``POST
               /api/rollouts/ID/approve``) or aborts;
``promoting``  send the update to every other device of the line; ``done``
               (``failed`` when some never reported it, listed);
``rolling_back`` send the canaries back to the bundle each ran before;
               ``rolled_back`` once every canary reports it again (``failed``
               after a refusal, or with the canaries that never confirmed their
               previous bundle listed).

Canaries given as a percentage are drawn at random from the line's fleet (seeded: the seed is in the plan, so a
draw can be repeated), not the first ids in sort order.

Every transition is a row in ``rollout_steps`` and the state is in
``rollouts``: a gateway that is killed resumes each unfinished rollout from its
recorded state when it starts again (re-sending what devices have not applied,
judging a watch window from the stored telemetry), so no device is left on an
unrecorded version. Conditions are parsed here (never ``eval``-ed):
``offload_rate <= baseline * 1.1 and rollbacks == 0 and p99_ms <= baseline * 1.5``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import secrets
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgecore.errors import EdgeError, GatewayError, TargetUnavailableError

from .store import GatewayStore
from .store.rollout_log import ACTIVE_ROLLOUT_STATES

ABORT_STEP = "abort requested"

log = logging.getLogger(__name__)

MAX_WATCH_S = 7 * 24 * 3600.0  # a canary watch longer than a week is a typo, not a plan
METRICS = ("offload_rate", "fallback_rate", "rollbacks", "errors", "drift", "p99_ms", "inputs")
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<op><=|>=|==|!=|<|>|\*|\+|-)|(?P<word>[A-Za-z_]+))")


# --- the condition language ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Cmp:
    metric: str
    op: str
    base: bool  # the right side refers to the metric's baseline
    arith: tuple[tuple[str, float], ...]  # "*", "+", "-" with a number, applied to the baseline left to right
    number: float

    def evaluate(self, m: dict[str, float], b: dict[str, float] | None) -> tuple[bool, str]:
        left = m.get(self.metric, math.nan)
        if self.base:
            if b is None or b.get(self.metric) is None:
                return False, f"{self.metric}: no baseline"
            right = float(b[self.metric])
            for op, num in self.arith:
                right = {"*": right * num, "+": right + num, "-": right - num}[op]
        else:
            right = self.number
        ok = {"<=": left <= right, ">=": left >= right, "<": left < right, ">": left > right,
              "==": left == right, "!=": left != right}[self.op]
        return ok, f"{self.metric} {left:.4g} {self.op} {right:.4g}: {'ok' if ok else 'FAILED'}"


@dataclass(frozen=True)
class Condition:
    text: str
    any_of: tuple[tuple[_Cmp, ...], ...]  # OR of ANDs

    def evaluate(self, metrics: dict[str, float], baseline: dict[str, float] | None) -> tuple[bool, list[str]]:
        notes: list[str] = []
        result = False
        for conj in self.any_of:
            outs = [c.evaluate(metrics, baseline) for c in conj]
            notes += [n for _, n in outs]
            result = result or all(ok for ok, _ in outs)
        return result, notes

    @property
    def needs_baseline(self) -> bool:
        return any(c.base for conj in self.any_of for c in conj)


def parse_condition(text: str) -> Condition:
    """``METRIC OP (NUMBER | baseline [* + -] NUMBER)`` joined by ``and`` / ``or``; a clear error otherwise."""
    toks: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise GatewayError(f"--promote-if: cannot read {text[pos:pos + 12].strip()!r} at position {pos}")
        kind = m.lastgroup or ""
        toks.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    conjs: list[tuple[_Cmp, ...]] = []
    cur: list[_Cmp] = []
    i = 0

    def need(kind: str, what: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks) or toks[i][0] != kind:
            where = f"at position {toks[i][2]} ({toks[i][1]!r})" if i < len(toks) else "at the end"
            raise GatewayError(f"--promote-if: expected {what} {where} in {text!r}")
        i += 1
        return toks[i - 1]

    while True:
        metric = need("word", f"a metric ({', '.join(METRICS)})")[1]
        if metric not in METRICS:
            raise GatewayError(f"--promote-if: unknown metric {metric!r} (known: {', '.join(METRICS)})")
        op = need("op", "a comparison (<= >= < > == !=)")[1]
        if op in "*+-":
            raise GatewayError(f"--promote-if: expected a comparison after {metric!r}, got {op!r}")
        if i < len(toks) and toks[i][0] == "word" and toks[i][1] == "baseline":
            i += 1
            arith: list[tuple[str, float]] = []
            while i < len(toks) and toks[i][0] == "op" and toks[i][1] in "*+-":
                i += 1
                arith.append((toks[i - 1][1], float(need("num", "a number")[1])))
            cur.append(_Cmp(metric, op, True, tuple(arith), 0.0))
        else:
            cur.append(_Cmp(metric, op, False, (), float(need("num", "a number or 'baseline'")[1])))
        if i >= len(toks):
            break
        joiner = need("word", "'and' or 'or'")[1]
        if joiner == "or":
            conjs.append(tuple(cur))
            cur = []
        elif joiner != "and":
            raise GatewayError(f"--promote-if: expected 'and' or 'or', got {joiner!r}")
    conjs.append(tuple(cur))
    return Condition(text, tuple(conjs))


def aggregate(windows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The rollout metrics over telemetry windows (None: no inputs in them)."""
    counts: dict[str, float] = {}
    p99 = 0.0
    drift = 0.0
    for w in windows:
        for k, v in (w.get("counts") or {}).items():
            if isinstance(v, (int, float)):
                counts[k] = counts.get(k, 0.0) + v
        edge = ((w.get("latency") or {}).get("edge") or {})
        if isinstance(edge.get("p99"), (int, float)):
            p99 = max(p99, float(edge["p99"]) * 1000.0)
        drift = max(drift, 1.0 if (w.get("drift") or {}).get("flag") else 0.0)
    n = counts.get("inputs", 0.0)
    if n <= 0:
        return None
    return {"inputs": n, "offload_rate": (counts.get("cloud", 0) + counts.get("fallback", 0)) / n,
            "fallback_rate": counts.get("fallback", 0) / n, "rollbacks": counts.get("rollbacks", 0),
            "errors": counts.get("fallback_error", 0), "drift": drift, "p99_ms": p99}


def watch_metrics(windows: list[dict[str, Any]], since: float) -> dict[str, float] | None:
    """`aggregate` over the windows that started at or after ``since`` (the canaries confirmed on the new bundle).

    A window open when a canary switched holds inputs the old bundle answered, and a drift verdict made on the
    few inputs since the switch: it says nothing about the new bundle, so it does not count.
    """
    return aggregate([w for w in windows if float(w.get("t_start") or 0.0) >= since])


def _busy(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The windows that saw inputs (an idle device's empty windows say nothing about its bundle)."""
    return [w for w in windows if ((w.get("counts") or {}).get("inputs") or 0) > 0]


# --- the manager ----------------------------------------------------------------------------------
def _manifest_bytes(tarball: Path) -> bytes:
    with tarfile.open(tarball, "r:gz") as tf:
        for m in tf:
            parts = m.name.lstrip("./").split("/")
            if parts[-1] == "manifest.json" and len(parts) <= 2 and m.isfile():  # at the root or in one folder
                f = tf.extractfile(m)
                if f is not None:
                    return f.read()
    raise GatewayError(f"{tarball.name}: no manifest.json in the bundle")


def manifest_sha256_of(tarball: Path) -> str:
    """The manifest sha256 a device reports in its status, read from a stored bundle tarball."""
    import hashlib

    return hashlib.sha256(_manifest_bytes(tarball)).hexdigest()


def target_of(tarball: Path) -> str | None:
    import json

    try:
        return str(json.loads(_manifest_bytes(tarball)).get("target"))
    except ValueError:
        return None


def line_of(tarball: Path) -> str:
    """The bundle's model line: its manifest's ``model.name``."""
    import json

    try:
        name = (json.loads(_manifest_bytes(tarball)).get("model") or {}).get("name")
    except (ValueError, AttributeError) as e:
        raise GatewayError(f"{tarball.name}: the manifest names no model") from e
    if not isinstance(name, str) or not name:
        raise GatewayError(f"{tarball.name}: the manifest names no model")
    return name


def device_line(row: dict[str, Any]) -> str | None:
    """The model line a stored device runs: the column (from its status), else its last telemetry's model name."""
    line = row.get("model_line")
    if not line:
        tel = row.get("last_telemetry")
        model = tel.get("model") if isinstance(tel, dict) else None
        line = model.get("name") if isinstance(model, dict) else None
    return line if isinstance(line, str) and line else None


class RolloutManager:
    """Drives rollouts from the store's records; one thread per active rollout; resumable."""

    def __init__(self, *, store: GatewayStore, bundles_dir: Path, send_command: Callable[[str, dict[str, Any]], Any],
                 base_url: Callable[[], str], update_timeout_s: float = 60.0,
                 poll_s: float = 0.2,
                 evaluate: Callable[[Path, Path | None, list[str]], dict[str, Any]] | None = None) -> None:
        # (device id, command) -> published, signed and expiring (`Gateway.send_command`)
        self.store, self.bundles_dir, self.send_command, self.base_url = store, Path(bundles_dir), send_command, base_url
        self.update_timeout_s, self.poll_s = update_timeout_s, poll_s
        # the gateway's own evidence (`cloud_gateway.evaluate.CandidateEvaluator.evaluate`); None: every
        # promotion waits for a person's approval
        self.evaluate = evaluate
        # whether this process drives rollouts (`cloud_gateway.leader`): another replica's API records a rollout,
        # the leader drives it (`adopt`)
        self.is_leader: Callable[[], bool] = lambda: True
        self._stop = threading.Event()
        self._threads: dict[int, threading.Thread] = {}
        self._spawning = threading.RLock()
        self._abort: set[int] = set()

    # --- starting ----------------------------------------------------------------------------------
    def start(self, *, bundle: str, canary: list[str] | str, watch_s: float, promote_if: str,
              line: str | None = None, canary_seed: int | None = None, min_reports: int | None = None) -> int:
        """Start a rollout of ``bundle`` to its model line; ``line`` (another line's name) moves that line to it.

        ``canary_seed`` seeds the draw of a percentage of canaries (None: a fresh random seed, recorded);
        ``min_reports``: distinct canaries whose telemetry the watch needs (None: every canary)."""
        cond = parse_condition(promote_if)
        if not math.isfinite(watch_s) or not 0 < watch_s <= MAX_WATCH_S:
            raise GatewayError(f"watch_s: the watch window must be a number of seconds in (0, {MAX_WATCH_S:g}], "
                               f"got {watch_s!r}")
        if not bundle or any(bad in bundle for bad in ("/", "\\", "..", "\0")):
            raise GatewayError(f"bundle: {bundle!r} is not a bundle name (a name in the gateway's store: no path "
                               "separators, no '..')")
        if self.store.rollouts.all(active=True):
            raise GatewayError("a rollout is already in progress (one at a time: abort it or wait)")
        tar = self.bundles_dir / f"{bundle}.tar.gz"
        if not tar.is_file():
            raise GatewayError(f"no bundle {bundle!r} in the gateway's store: upload it first (PUT /api/bundles/{bundle})")
        new_sha, target, new_line = manifest_sha256_of(tar), target_of(tar), line_of(tar)
        from_line = line or new_line
        # the fleet for this bundle: the devices of its model line running the same target (a TFLite bundle never
        # goes to an ORT one, an image model's never to a tabular one); the others are counted, with why
        fleet: dict[str, dict[str, Any]] = {}
        excluded: dict[str, list[str]] = {}
        for d in self.store.devices.all():
            st, dl = d.get("status"), device_line(d)
            if not isinstance(st, dict):
                why = "no status"
            elif st.get("state") == "offline":  # listed, never counted as fleet (nor waited for)
                why = "offline"
            elif dl is None:
                why = "no model line reported"
            elif dl != from_line:
                why = f"model line {dl}"
            elif st.get("target") not in (target, None):
                why = f"target {st.get('target')}"
            else:
                fleet[d["device_id"]] = d
                continue
            excluded.setdefault(why, []).append(d["device_id"])
        if line is not None and line != new_line and not fleet:
            raise GatewayError(f"--line {line}: no device of model line {line} on target {target}")
        seed = int(canary_seed) if canary_seed is not None else secrets.randbits(32)
        canaries = self._canaries(canary, sorted(fleet), excluded, seed=seed)
        need = len(canaries) if min_reports is None else int(min_reports)
        if not 1 <= need <= len(canaries):
            raise GatewayError(f"min_reports: {min_reports!r} canaries cannot report: there are {len(canaries)} "
                               f"({', '.join(canaries)})")
        index = self._index()
        previous: dict[str, Any] = {}
        for d in canaries:
            sha = fleet[d]["status"].get("bundle_sha256")
            if sha not in index:
                raise GatewayError(f"canary {d} runs a bundle ({str(sha)[:12]}) that is not in the gateway's store: "
                                   "upload it first, so that a rollback is possible")
            previous[d] = {"manifest_sha256": sha, "bundle": index[sha]}
        baseline = aggregate([w for d in canaries for w in _busy(self.store.telemetry.history(d, limit=1000))[-20:]])
        if baseline is None and cond.needs_baseline:
            raise GatewayError(f"--promote-if compares with the baseline, but the canaries {canaries} sent no "
                               "telemetry yet")
        summary = {why: len(ids) for why, ids in sorted(excluded.items())}
        plan = {"canaries": canaries, "rest": [d for d in sorted(fleet) if d not in canaries],
                "previous": previous, "manifest_sha256": new_sha, "watch_s": watch_s, "promote_if": promote_if,
                "line": new_line, "excluded": {why: sorted(ids) for why, ids in sorted(excluded.items())},
                "excluded_count": summary, "canary_seed": seed, "min_reports": need}
        if from_line != new_line:
            plan["line_change"] = {"from": from_line, "to": new_line}
        with self._spawning:  # (this process's `adopt` waits until the rollout is recorded whole)
            rid = self.store.rollouts.create(bundle, plan, baseline)
            self.store.rollouts.add_step(rid, "started", {"canaries": canaries, "baseline": baseline, "bundle": bundle,
                                                          "line": new_line, "excluded": summary, "canary_seed": seed,
                                                          "min_reports": need})
            if from_line != new_line:
                self.store.rollouts.add_step(rid, "line change", {"from": from_line, "to": new_line,
                                                                  "devices": sorted(fleet)})
                log.warning("rollout %d moves model line %s to %s (%d devices)", rid, from_line, new_line, len(fleet))
            if self.is_leader():
                self._spawn(rid)
            else:  # recorded: the leader replica adopts it within its next poll
                self.store.rollouts.add_step(rid, "queued for the leader", {})
        return rid

    @staticmethod
    def _canaries(spec: list[str] | str, known: list[str], excluded: dict[str, list[str]], *, seed: int) -> list[str]:
        if isinstance(spec, str) and spec.strip().endswith("%"):
            try:
                pct = float(spec.strip()[:-1])
            except ValueError as e:
                raise GatewayError(f"--canary {spec!r}: expected device ids or a percentage like 10%") from e
            if not 0 < pct < 100 or not known:
                raise GatewayError(f"--canary {spec}: needs 0 < percent < 100 and a known fleet ({len(known)} devices)")
            # drawn at random (seeded, recorded), not the first in sort order: which devices test a bundle is
            # not something a device can arrange by its name
            return sorted(random.Random(seed).sample(known, max(1, math.floor(len(known) * pct / 100))))
        ids = [d.strip() for d in (spec.split(",") if isinstance(spec, str) else spec) if d.strip()]
        unknown = [d for d in ids if d not in known]
        outside = {d: why for why, ds in excluded.items() for d in ds if d in unknown}
        if outside:
            raise GatewayError("--canary: not in this bundle's fleet: "
                               + ", ".join(f"{d} ({why})" for d, why in sorted(outside.items())))
        if not ids or unknown:
            raise GatewayError(f"--canary: unknown device(s) {unknown or ids} (known: {', '.join(known) or 'none'})")
        return ids

    def _index(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in sorted(self.bundles_dir.glob("*.tar.gz")):
            try:
                out.setdefault(manifest_sha256_of(p), p.name.removesuffix(".tar.gz"))
            except (GatewayError, OSError, tarfile.TarError):
                continue
        return out

    # --- running -----------------------------------------------------------------------------------
    def resume(self) -> list[int]:
        """Pick up every unfinished rollout (after a restart, or on becoming the leader); returns their ids."""
        self._stop.clear()
        return self.adopt(step="resumed")

    def adopt(self, *, step: str = "adopted") -> list[int]:
        """Drive every unfinished rollout no thread of this process drives yet (one another replica's API
        started); returns their ids."""
        with self._spawning:  # (not between `start` recording a rollout and spawning its thread)
            ids = [int(r["id"]) for r in self.store.rollouts.all(active=True) if not self._driven(int(r["id"]))]
            for rid in ids:
                state = (self.store.rollouts.get(rid) or {}).get("state")
                self.store.rollouts.add_step(rid, step, {"state": state})
                self._spawn(rid)
        return ids

    def _driven(self, rid: int) -> bool:
        t = self._threads.get(rid)
        return t is not None and t.is_alive()

    def abort(self, rollout_id: int) -> None:
        """Recorded in the store, so the replica driving the rollout sees it whichever replica was asked."""
        r = self.store.rollouts.get(rollout_id)
        if r is None or r["state"] not in ACTIVE_ROLLOUT_STATES:
            raise GatewayError(f"rollout {rollout_id} is not in progress")
        self._abort.add(rollout_id)
        self.store.rollouts.add_step(rollout_id, ABORT_STEP, {})

    def _aborted(self, rid: int) -> bool:
        if rid not in self._abort and self.store.rollouts.has_step(rid, ABORT_STEP):
            self._abort.add(rid)
        return rid in self._abort

    def approve(self, rollout_id: int, *, by: str = "a person") -> None:
        """A person's approval of a rollout waiting for one (the gateway had no evidence of its own)."""
        r = self.store.rollouts.get(rollout_id)
        if r is None or r["state"] != "awaiting_approval":
            raise GatewayError(f"rollout {rollout_id} is not waiting for an approval "
                               f"(state {r['state'] if r else 'unknown'})")
        self._to(rollout_id, "promoting", f"approved by {by}", {})

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads.values():
            t.join(5)
        self._threads.clear()

    def _spawn(self, rid: int) -> None:
        with self._spawning:
            if self._driven(rid):  # one thread per rollout in this process
                return
            t = threading.Thread(target=self._drive, args=(rid,), name=f"rollout-{rid}", daemon=True)
            self._threads[rid] = t
            t.start()

    def _drive(self, rid: int) -> None:
        try:
            while not self._stop.is_set():
                r = self.store.rollouts.get(rid)
                if r is None or r["state"] not in ACTIVE_ROLLOUT_STATES:
                    return
                getattr(self, f"_{r['state']}")(rid, r)
        except Exception as e:  # a bug or the database away: recorded, the rollout resumes on the next start
            log.exception("rollout %d stopped", rid)
            try:
                self.store.rollouts.add_step(rid, "interrupted", {"error": f"{type(e).__name__}: {e}"})
            except Exception:  # the database is what failed
                pass

    def _send(self, devices: list[str], bundle: str, cmd_id: str, allow_line_change: bool,
              rollback: bool = False) -> None:
        url = f"{self.base_url().rstrip('/')}/api/bundles/{bundle}"
        from edgecore.bundle import sha256_file

        sha = sha256_file(self.bundles_dir / f"{bundle}.tar.gz")
        cmd: dict[str, Any] = {"cmd": "update_bundle", "id": cmd_id, "url": url, "sha256": sha}
        if allow_line_change:  # only a rollout started with another --line (both ways: its rollback too)
            cmd["allow_line_change"] = True
        if rollback:  # back to the bundle each canary ran before: a device accepts that lower release only then
            cmd["rollback"] = True
        for d in devices:
            self.send_command(d, cmd)

    def _running(self, devices: list[str], sha: str) -> list[str]:
        """Those of ``devices`` whose status reports ``sha``: one query per 500 devices, whatever their number."""
        rows = self.store.devices.versions(devices)
        return [d for d in devices if ((rows.get(d) or {}).get("status") or {}).get("bundle_sha256") == sha]

    def _refused(self, devices: list[str], cmd_id: str) -> dict[str, str]:
        """Those of ``devices`` whose status says this command failed, with the device's error (one query)."""
        out = {}
        for d, row in self.store.devices.versions(devices).items():
            last = (row.get("status") or {}).get("last_cmd") or {}
            if isinstance(last, dict) and last.get("id") == cmd_id and last.get("ok") is False:
                out[d] = str(last.get("error") or "refused")
        return out

    def _wait_applied(self, rid: int, devices: list[str], sha: str, bundle: str, *, rollback: bool = False) -> list[str]:
        """Send ``bundle`` to those of ``devices`` not on it; wait until they report it or refuse it (the
        command's id comes back in a device's ``last_cmd``); returns the ones still not on it."""
        return self._wait_all(rid, {d: (sha, bundle) for d in devices}, rollback=rollback)

    def _wait_all(self, rid: int, want: dict[str, tuple[str, str]], *, rollback: bool = False) -> list[str]:
        """Each device of ``want`` to its (manifest sha, bundle), all at once: commands to those not on theirs,
        then one wait (one query per check) until each reports its bundle or refuses it, or the update timeout
        ends for all of them together; returns the devices still not on theirs."""
        r = self.store.rollouts.get(rid) or {}
        line_change = bool((r.get("plan") or {}).get("line_change"))

        def missing() -> list[str]:  # one query per 500 devices per check (it was one per device per device)
            rows = self.store.devices.versions(list(want))
            return [d for d, (sha, _) in want.items()
                    if ((rows.get(d) or {}).get("status") or {}).get("bundle_sha256") != sha]

        by_bundle: dict[tuple[str, str], list[str]] = {}
        for d in missing():
            by_bundle.setdefault(want[d], []).append(d)
        for (sha, bundle), todo in by_bundle.items():
            self._send(todo, bundle, f"rollout-{rid}-{sha[:12]}", line_change, rollback)
        end = time.monotonic() + self.update_timeout_s
        while time.monotonic() < end and not self._stop.is_set():
            left = missing()
            # (an abort stops waiting for an update, never for the rollback it asks for)
            if not left or (not rollback and self._aborted(rid)) or \
                    set(self._refused_any(rid, left, want)) == set(left):
                return left
            time.sleep(self.poll_s)
        return missing()

    def _refused_any(self, rid: int, devices: list[str], want: dict[str, tuple[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for sha in {want[d][0] for d in devices}:
            out.update(self._refused([d for d in devices if want[d][0] == sha], f"rollout-{rid}-{sha[:12]}"))
        return out

    def _why_not(self, devices: list[str], sha: str, rid: int) -> dict[str, str]:
        """Each device's reason for not running ``sha``: its refusal, or that it never answered."""
        refused = self._refused(devices, f"rollout-{rid}-{sha[:12]}")
        return {d: refused.get(d, "no answer (offline, or still updating at the timeout)") for d in devices}

    def _updating(self, rid: int, r: dict[str, Any]) -> None:
        plan = r["plan"]
        missing = self._wait_applied(rid, plan["canaries"], plan["manifest_sha256"], r["bundle"])
        if self._stop.is_set():
            return
        if self._aborted(rid):
            return self._to(rid, "rolling_back", "aborted", {})
        if missing:
            refused = self._why_not(missing, plan["manifest_sha256"], rid)
            self.store.rollouts.update(rid, result={**(r.get("result") or {}), "refused": refused})
            return self._to(rid, "rolling_back", "canary update failed", {"not_updated": missing, "refused": refused})
        self.store.rollouts.update(rid, result={"watch_from": time.time()})
        self._to(rid, "watching", "canaries updated", {"canaries": plan["canaries"]})

    def _watching(self, rid: int, r: dict[str, Any]) -> None:
        plan = r["plan"]
        since = float((r.get("result") or {}).get("watch_from") or time.time())
        while time.time() < since + plan["watch_s"] and not self._stop.is_set():
            if self._aborted(rid):
                return self._to(rid, "rolling_back", "aborted", {})
            time.sleep(self.poll_s)
        if self._stop.is_set():
            return
        on = set(self._running(plan["canaries"], plan["manifest_sha256"]))
        off = [d for d in plan["canaries"] if d not in on]
        per = {d: self.store.telemetry.since(d, since) for d in plan["canaries"]}
        metrics = watch_metrics([w for ws in per.values() for w in ws], since)
        if off:
            return self._to(rid, "rolling_back", "a canary left the new bundle (its own rollback)", {"devices": off})
        if metrics is None:
            return self._to(rid, "rolling_back", "no telemetry from the canaries in the watch window: cannot judge", {})
        reported = sorted(d for d, ws in per.items() if watch_metrics(ws, since) is not None)
        need = int(plan.get("min_reports") or len(plan["canaries"]))
        if len(reported) < need:
            return self._to(rid, "rolling_back", "too few canaries reported", {
                "reported": reported, "silent": [d for d in plan["canaries"] if d not in reported], "min_reports": need})
        ok, notes = parse_condition(plan["promote_if"]).evaluate(metrics, r.get("baseline"))
        detail = {"metrics": metrics, "baseline": r.get("baseline"), "checks": notes, "reported": reported}
        if not ok:  # what devices report can stop a rollout ...
            return self._to(rid, "rolling_back", "condition failed", detail)
        self.store.rollouts.add_step(rid, "condition met", detail)
        self._judge(rid, r)  # ... but only the gateway's own evidence (or a person) promotes it

    def _judge(self, rid: int, r: dict[str, Any]) -> None:
        """The gateway evaluates the bundle itself (`cloud_gateway.evaluate`): pass -> promoting, fail -> rolling
        back; no evidence (no inputs, or a target it cannot run) -> awaiting a person's approval."""
        from .evaluate import NoEvidence

        plan = r["plan"]
        if self.evaluate is None:
            return self._to(rid, "awaiting_approval", "awaiting a person's approval",
                            {"why": "this gateway evaluates no bundles (no evaluator)"})
        prev_names = [p["bundle"] for p in plan["previous"].values() if p.get("bundle")]
        previous = (self.bundles_dir / f"{max(set(prev_names), key=prev_names.count)}.tar.gz") if prev_names else None
        try:
            ev = self.evaluate(self.bundles_dir / f"{r['bundle']}.tar.gz", previous,
                               [*plan["canaries"], *plan["rest"]])
        except (NoEvidence, TargetUnavailableError) as e:
            return self._to(rid, "awaiting_approval", "awaiting a person's approval", {"why": str(e)})
        except (EdgeError, OSError, ValueError) as e:
            return self._to(rid, "rolling_back", "gateway evaluation failed", {"error": f"{type(e).__name__}: {e}"})
        self.store.rollouts.update(rid, result={**(r.get("result") or {}), "evaluation": ev})
        if ev["ok"]:
            return self._to(rid, "promoting", "gateway evaluation passed", ev)
        self._to(rid, "rolling_back", "gateway evaluation failed", ev)

    def _awaiting_approval(self, rid: int, r: dict[str, Any]) -> None:
        """Nothing to do but wait: `approve` moves it on; an abort rolls the canaries back."""
        if self._aborted(rid):
            return self._to(rid, "rolling_back", "aborted", {})
        time.sleep(self.poll_s)

    def _promoting(self, rid: int, r: dict[str, Any]) -> None:
        """Every online device of the line gets the bundle; the offline ones are listed, not waited for (they
        keep the version they ran, recorded); never ``done`` while an online device is not on the bundle."""
        plan = r["plan"]
        sha = plan["manifest_sha256"]

        def offline(devices: list[str]) -> list[str]:
            rows = self.store.devices.versions(devices)
            return [d for d in devices if (rows.get(d) or {}).get("state") != "online"]

        away = offline(plan["rest"])
        online = [d for d in plan["rest"] if d not in set(away)]
        missing = self._wait_applied(rid, online, sha, r["bundle"]) if online else []
        if self._stop.is_set():
            return
        if missing:  # a device that went offline meanwhile is listed with the offline ones
            gone = set(offline(missing)) - set(self._running(missing, sha))
            away += [d for d in missing if d in gone]
            missing = [d for d in missing if d not in gone]
        detail: dict[str, Any] = {"updated": [d for d in online if d not in missing and d not in set(away)],
                                  "not_updated": missing, "offline": sorted(away)}
        if missing:  # a device of the line that refused (or never took) the bundle: not a finished rollout
            detail["refused"] = self._why_not(missing, plan["manifest_sha256"], rid)
            self.store.rollouts.update(rid, result={**(r.get("result") or {}), "refused": detail["refused"]})
            return self._to(rid, "failed", "promotion incomplete", detail)
        self._to(rid, "done", "promoted to the fleet" + (f" ({len(away)} offline, not updated)" if away else ""),
                 detail)

    def _rolling_back(self, rid: int, r: dict[str, Any]) -> None:
        plan = r["plan"]
        # every canary back to its own previous bundle at once, under one timeout
        left = self._wait_all(rid, {d: (p["manifest_sha256"], p["bundle"]) for d, p in plan["previous"].items()},
                              rollback=True)
        if self._stop.is_set():
            return
        refused = (r.get("result") or {}).get("refused")
        detail: dict[str, Any] = {"not_restored": left, **({"refused": refused} if refused else {})}
        if left:  # a rollback is done only when every canary confirms its previous bundle
            detail["why_not"] = {d: self._why_not([d], plan["previous"][d]["manifest_sha256"], rid)[d] for d in left}
            return self._to(rid, "failed", "rollback incomplete", detail)
        self._to(rid, "failed" if refused else "rolled_back", "canaries back on their previous bundles", detail)

    def _to(self, rid: int, state: str, step: str, detail: dict[str, Any]) -> None:
        self.store.rollouts.add_step(rid, step, detail)
        self.store.rollouts.update(rid, state=state)
        log.info("rollout %d: %s -> %s", rid, step, state)
