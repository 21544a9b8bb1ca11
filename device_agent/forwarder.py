"""The outbox forwarder: oldest row first, one at a time, deleted only after the broker's PUBACK, or, once a
gateway acknowledges windows, only after the gateway's acknowledgement (`Outbox.ack`, `Outbox.gateway_acked`)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from edgecore.mqtt import MqttLink

from .outbox import Outbox

log = logging.getLogger(__name__)


class OutboxForwarder:
    """Runs in its own thread until ``stop`` is set; a reconnect (or a stuck publish) re-sends the row."""

    def __init__(self, outbox: Outbox, link: MqttLink, stop: threading.Event, *, stuck_s: float = 10.0,
                 resend_after_s: float = 30.0) -> None:
        self.outbox = outbox
        self.link = link
        self.stop = stop
        self.stuck_s = stuck_s
        self.resend_after_s = resend_after_s  # a window the broker took but no gateway acknowledged: sent again
        self.forwarded = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                row = self.outbox.peek(resend_after_s=self.resend_after_s)
                if row is None or not self.link.connected.wait(0.2):
                    self.stop.wait(0.05)
                    continue
                if self.forward_one(*row):
                    self.forwarded += 1
            except (OSError, sqlite3.Error) as e:  # a full disk (an ack is a write): wait, then try again
                log.error("outbox forwarding failed (%s); retrying in a second", e)
                self.stop.wait(1.0)

    def forward_one(self, row_id: int, topic: str, payload: bytes) -> bool:
        """Publish one row at QoS 1; True (and the row acked) once the broker confirmed it."""
        gen = self.link.generation
        info = self.link.publish(topic, payload, qos=1)
        t0 = time.monotonic()
        while not self.stop.is_set():
            if info.is_published():
                self.outbox.ack(row_id)
                return True
            if self.link.generation != gen or time.monotonic() - t0 > self.stuck_s:
                return False  # reconnected (or stuck): publish the row again
            time.sleep(0.01)
        return False
