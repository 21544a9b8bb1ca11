"""The cloud client: ask the gateway about uncertain inputs, collect replies within a deadline.

Requests go out on ``<prefix>/<id>/infer/req`` with a random correlation id
(an MQTT 5 property, or the envelope of `edgecore.wire` on MQTT 3.1.1) and a
message expiry equal to the deadline; replies arrive on ``.../infer/resp`` and
are matched through the pending table. Every request ends in exactly one
`CloudResult`: an answer, or a fallback with its reason (``broker``: no link or
the publish failed; ``timeout``: no reply in time; ``error``: the gateway
replied with an error or nonsense).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from edgecore import wire
from edgecore.mqtt import MqttLink
from edgecore.tasks.classify import Classify


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None


@dataclass(frozen=True)
class Ticket:
    correlation: bytes
    pending: _Pending
    sent: float  # perf_counter at publish


@dataclass(frozen=True)
class CloudResult:
    prediction: Any  # the task's prediction (`Task.read_reply`); None: fall back to the device's own
    reason: str | None  # broker | timeout | error when falling back
    rtt_s: float | None = None


BROKER_DOWN = CloudResult(None, "broker")


class CloudClient:
    def __init__(self, topics: wire.Topics, *, deadline_s: float,
                 read_reply: Callable[[Mapping[str, Any]], Any] | None = None) -> None:
        self.topics = topics
        self.deadline_s = deadline_s
        # the prediction in a gateway's reply, or None (malformed: reason ``error``); the model's task's
        # `Task.read_reply`, a class index by default
        self.read_reply: Callable[[Mapping[str, Any]], Any] = read_reply or Classify().read_reply
        self.link: MqttLink | None = None
        self._pending: dict[bytes, _Pending] = {}

    def attach(self, link: MqttLink | None) -> None:
        """Use ``link`` (subscribing to the response topic); None detaches (every ask falls back)."""
        self.link = link
        if link is not None:
            link.subscribe(self.topics.resp, self.on_response)

    @property
    def connected(self) -> bool:
        """A link is attached and connected (else every `ask` falls back with reason ``broker``)."""
        link = self.link
        return link is not None and link.connected.is_set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def ask(self, x: np.ndarray, *, confidence: float | None = None, flag: bool = False,
            bundle: str | None = None) -> Ticket | None:
        """Publish one preprocessed sample; None when there is no connected link or the publish failed.

        MQTT 5 requests also carry the device model's ``confidence`` and, with ``flag``, ask the gateway to
        collect this input (user properties ``conf`` and ``collect``; docs/wire.md). 3.1.1 requests carry neither.
        """
        link = self.link
        if link is None or not link.connected.is_set():  # (`connected`, with the link narrowed)
            return None
        corr = uuid.uuid4().bytes
        pend = _Pending()
        self._pending[corr] = pend
        payload = wire.encode_tensor(x[None])
        if not link.v5:
            payload = wire.encode_request(payload, correlation=corr, response_topic=self.topics.resp)
        info = link.publish(
            self.topics.req, payload, qos=1, response_topic=self.topics.resp,
            correlation=corr, expiry_s=max(1, int(np.ceil(self.deadline_s))),
            user=_request_properties(confidence, flag, bundle),
        )
        if info.rc != 0:
            self._pending.pop(corr, None)
            return None
        return Ticket(corr, pend, time.perf_counter())

    def collect(self, tickets: dict[int, Ticket | None]) -> dict[int, CloudResult]:
        """Wait (until one deadline from now, shared by all) for each ticket's reply."""
        deadline = time.monotonic() + self.deadline_s
        return {i: self._result(t, deadline) if t is not None else BROKER_DOWN for i, t in tickets.items()}

    def _result(self, t: Ticket, deadline: float) -> CloudResult:
        t.pending.event.wait(max(0.0, deadline - time.monotonic()))
        self._pending.pop(t.correlation, None)
        rep = t.pending.reply
        if rep is None:
            return CloudResult(None, "timeout")
        pred = self.read_reply(rep) if rep.get("ok") else None
        if pred is None:
            return CloudResult(None, "error")
        return CloudResult(pred, None, float(rep["_received"]) - t.sent)

    def on_response(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        try:
            rep = wire.loads(msg.payload)
        except wire.WireError as e:
            rep = {"ok": False, "error": str(e)}
        if not corr and isinstance(rep.get("correlation"), str):  # MQTT 3.1.1: echoed in the body
            try:
                corr = bytes.fromhex(rep["correlation"])
            except ValueError:
                return
        pend = self._pending.get(bytes(corr)) if corr else None
        if pend is None:
            return  # late (after its deadline) or unknown: the input was already answered
        rep["_received"] = time.perf_counter()
        pend.reply = rep
        pend.event.set()


def _request_properties(confidence: float | None, flag: bool, bundle: str | None) -> list[tuple[str, str]] | None:
    props = [] if confidence is None else [("conf", f"{confidence:.6g}")]
    if bundle:
        props.append(("bundle", bundle[:128]))
    if flag:
        props.append(("collect", "1"))
    return props or None
