"""Commands to a device, signed by the gateway: who may order a device to do something, and until when.

A command is JSON on ``<prefix>/<id>/cmd``. Signed, it travels in an envelope::

    {"schema": 1, "signed": "<the command's JSON text>", "key_id": "<16 hex>", "sig": "<base64 Ed25519>"}

The signature covers the exact UTF-8 bytes of ``signed`` (no canonical JSON to disagree on), and the command
inside names its ``device``, when it was ``issued`` and when it ``expires`` (Unix seconds), and a random
``nonce``. A device (`CommandTrust.open`) runs a command only when

* a key it trusts for commands signed it (the gateway's command key, not the release key that signs bundles:
  the gateway never holds that one),
* it is addressed to this device (a command captured on one device's topic does not run on another),
* it has not expired and was not issued in the future (beyond ``clock_skew_s``), and its lifetime is at most
  ``max_ttl_s`` (no command is valid for ever),
* its nonce was not seen before (`SeenCommands`, kept in the device's state folder until the command expires,
  so a restart does not reopen the window): a replayed command is refused.

The MQTT ACL already stops a device writing its own command topic; the signature stops anyone else who can
reach the broker (an operator login, a compromised bridge, a replayed capture). Without trusted command keys a
device refuses every command unless told ``allow_unsigned`` (development only, logged loudly).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgecore.errors import AgentError
from edgecore.fsutil import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CommandTrust", "CommandRefused", "SeenCommands", "seal", "DEFAULT_TTL_S", "MAX_TTL_S", "ENVELOPE_SCHEMA"]

ENVELOPE_SCHEMA = 1
DEFAULT_TTL_S = 300.0
MAX_TTL_S = 86400.0  # a device refuses a command valid for longer than a day
CLOCK_SKEW_S = 120.0
MAX_SIGNED_BYTES = 64 * 1024


class CommandRefused(AgentError):
    """A command the device will not run: unsigned, signed by a key it does not trust, expired, replayed,
    addressed to another device."""


def seal(cmd: dict[str, Any], *, device: str, key: Any, ttl_s: float = DEFAULT_TTL_S,
         now: float | None = None) -> bytes:
    """The signed envelope of ``cmd`` for ``device`` (``key``: an Ed25519 private key), valid ``ttl_s`` seconds."""
    from edgecore.signing import key_id

    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"command lifetime must be within 0..{MAX_TTL_S:g} s, got {ttl_s}")
    issued = time.time() if now is None else now
    body = {k: v for k, v in cmd.items() if k not in ("schema", "device", "issued", "expires", "nonce")}
    body.update(device=device, issued=round(issued, 3), expires=round(issued + ttl_s, 3),
                nonce=secrets.token_hex(16))
    text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    sig = key.sign(text.encode())
    return json.dumps({"schema": ENVELOPE_SCHEMA, "signed": text, "key_id": key_id(key.public_key()),
                       "sig": base64.b64encode(sig).decode()}, separators=(",", ":")).encode()


class SeenCommands:
    """Nonces of the commands this device ran, each kept until its command expires (then a replay is refused by
    its expiry anyway). ``path``: a JSON file in the device's state folder, written atomically; None: memory only.
    Bounded: past ``max_entries`` the soonest-expiring are forgotten and every command issued before the newest
    forgotten one is refused from then on (a floor), so forgetting never reopens a replay."""

    def __init__(self, path: Path | None, *, max_entries: int = 4096) -> None:
        self.path, self.max_entries = path, max_entries
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # nonce -> expires
        self.floor = 0.0  # commands issued at or before this are refused
        if path is not None and path.exists():
            try:
                doc = json.loads(path.read_text())
                self._seen = {str(k): float(v) for k, v in dict(doc.get("seen", {})).items()}
                self.floor = float(doc.get("floor", 0.0))
            except (OSError, ValueError, TypeError, AttributeError) as e:
                # an unreadable record must not reopen replays: refuse everything issued before now
                log.error("%s unreadable (%s): refusing commands issued before this start", path, e)
                self._seen, self.floor = {}, time.time()

    def check_and_add(self, nonce: str, *, issued: float, expires: float, now: float) -> None:
        with self._lock:
            if nonce in self._seen:
                raise CommandRefused("a replayed command (this command already ran here)")
            if issued <= self.floor:
                raise CommandRefused("a command older than the commands this device still remembers "
                                     "(a replay, or one delayed too long): send it again")
            self._seen = {n: e for n, e in self._seen.items() if e >= now}
            self._seen[nonce] = expires
            if len(self._seen) > self.max_entries:
                # forget the soonest-expiring; later ones keep their nonces
                drop = sorted(self._seen.items(), key=lambda kv: kv[1])[: len(self._seen) - self.max_entries]
                for n, _ in drop:
                    del self._seen[n]
                self.floor = max(self.floor, now)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path, json.dumps({"floor": self.floor, "seen": self._seen}))


@dataclass
class CommandTrust:
    """Which commands a device runs: signed by one of ``keys`` (`edgecore.signing.TrustedKey`), or, with
    ``allow_unsigned`` (development only), also unsigned ones. Neither: every command is refused, saying what to
    set."""

    keys: tuple[Any, ...] = ()
    allow_unsigned: bool = False
    clock_skew_s: float = CLOCK_SKEW_S
    seen: SeenCommands = field(default_factory=lambda: SeenCommands(None))

    @classmethod
    def from_paths(cls, paths: Sequence[Path | str] = (), *, allow_unsigned: bool = False,
                   state: Path | None = None) -> "CommandTrust":
        from edgecore.signing import load_public_keys

        return cls(keys=tuple(load_public_keys(paths)), allow_unsigned=allow_unsigned,
                   seen=SeenCommands(state))

    def with_state(self, path: Path | None) -> "CommandTrust":
        """This policy remembering the commands it ran in ``path`` (the agent's state folder)."""
        return CommandTrust(self.keys, self.allow_unsigned, self.clock_skew_s, SeenCommands(path))

    def warn_if_open(self, who: str) -> None:
        """Say at start-up what this policy does with commands when that is not the normal case."""
        if self.allow_unsigned and not self.keys:
            log.warning("%s runs UNSIGNED commands (--allow-unsigned-commands): anyone who can publish on its "
                        "command topic controls it. Development only.", who)
        elif not self.keys:
            log.warning("%s trusts no command key (--command-key): every command (updates, rollouts, "
                        "thresholds, bench jobs) will be refused", who)

    def open(self, payload: dict[str, Any], *, device: str, now: float | None = None) -> dict[str, Any]:
        """The command to run from a message's JSON object, or `CommandRefused` saying why not."""
        now = time.time() if now is None else now
        if "signed" not in payload:
            if self.allow_unsigned and not self.keys:
                return payload
            raise CommandRefused(
                "command not signed by the gateway (this device runs only commands signed by a command key it "
                "trusts: " + (", ".join(sorted(k.key_id for k in self.keys)) if self.keys else
                              "none configured; give the gateway's command key .pub with --command-key") + ")")
        cmd = self._verified(payload)
        if cmd.get("device") != device:
            raise CommandRefused(f"command addressed to device {str(cmd.get('device'))[:64]!r}, not this one")
        issued, expires, nonce = cmd.get("issued"), cmd.get("expires"), cmd.get("nonce")
        if type(issued) not in (int, float) or type(expires) not in (int, float) or \
                not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
            raise CommandRefused("signed command without a valid issued/expires time and nonce")
        issued, expires = float(issued), float(expires)  # type: ignore[arg-type]
        if not (math.isfinite(issued) and math.isfinite(expires)):
            raise CommandRefused("signed command without a valid issued/expires time and nonce")
        if expires - issued > MAX_TTL_S or expires <= issued:
            raise CommandRefused(f"command valid for {expires - issued:.0f} s (at most {MAX_TTL_S:.0f} s accepted)")
        if now > expires:
            raise CommandRefused(f"command expired {now - expires:.0f} s ago (a replayed or delayed command; "
                                 "check the device's clock if this repeats)")
        if issued > now + self.clock_skew_s:
            raise CommandRefused(f"command issued {issued - now:.0f} s in the future (the device's or the "
                                 "gateway's clock is wrong)")
        self.seen.check_and_add(nonce, issued=float(issued), expires=float(expires), now=now)
        return cmd

    def _verified(self, payload: dict[str, Any]) -> dict[str, Any]:
        from cryptography.exceptions import InvalidSignature

        text, kid, sig = payload.get("signed"), payload.get("key_id"), payload.get("sig")
        if payload.get("schema", ENVELOPE_SCHEMA) != ENVELOPE_SCHEMA or not isinstance(text, str) or \
                not isinstance(kid, str) or not isinstance(sig, str):
            raise CommandRefused(f"not a signed command envelope of schema {ENVELOPE_SCHEMA}")
        if len(text) > MAX_SIGNED_BYTES:
            raise CommandRefused(f"signed command over {MAX_SIGNED_BYTES} bytes")
        key = next((k for k in self.keys if k.key_id == kid), None)
        if key is None:
            trusted = ", ".join(sorted(k.key_id for k in self.keys)) or "none configured"
            raise CommandRefused(f"command signed by key {kid[:16]!r}, which this device does not trust for "
                                 f"commands (trusted: {trusted})")
        try:
            key.key.verify(base64.b64decode(sig, validate=True), text.encode())
        except (InvalidSignature, ValueError) as e:
            raise CommandRefused(f"command signature by key {kid} does not verify (altered or forged)") from e
        try:
            cmd = json.loads(text)
        except json.JSONDecodeError as e:
            raise CommandRefused(f"signed command is not JSON ({e})") from e
        if not isinstance(cmd, dict):
            raise CommandRefused("signed command is not a JSON object")
        return cmd
