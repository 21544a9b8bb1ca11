"""Commands come only from the gateway: signed by its command key, for one device, expiring, never replayed.

Unit tests of `edgecore.commands` (each refusal class, and a sibling that passes), then a real agent on a real
broker: a command an operator login publishes unsigned is refused, a captured signed command replayed is refused
(also after the agent restarts), and the gateway's signed command runs.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from edgecore.commands import CommandRefused, CommandTrust, SeenCommands, seal
from tests.agent.tiny import command_key, command_trust, make_agent, seal_command, wait_for


def _open(payload: bytes, trust: CommandTrust | None = None, device: str = "dev-a", now: float | None = None):
    return (trust or command_trust()).open(json.loads(payload), device=device, now=now)


def test_a_sealed_command_opens_with_its_fields_and_the_schema_field_is_not_signed_twice():
    cmd = _open(seal_command("dev-a", {"schema": 1, "cmd": "set_threshold", "threshold": 0.4, "id": 7}))
    assert cmd["cmd"] == "set_threshold" and cmd["threshold"] == 0.4 and cmd["id"] == 7
    assert cmd["device"] == "dev-a" and cmd["expires"] - cmd["issued"] == pytest.approx(300) and len(cmd["nonce"]) == 32


def test_an_unsigned_command_is_refused_saying_what_to_configure_unless_development_allows_it():
    plain = {"schema": 1, "cmd": "set_threshold", "threshold": 0.1}
    with pytest.raises(CommandRefused, match="not signed by the gateway"):
        command_trust().open(plain, device="dev-a")
    with pytest.raises(CommandRefused, match="--command-key"):
        CommandTrust().open(plain, device="dev-a")  # the default: nothing trusted, nothing runs
    assert CommandTrust(allow_unsigned=True).open(plain, device="dev-a") == plain
    # with a command key configured, --allow-unsigned-commands does not reopen unsigned ones
    with pytest.raises(CommandRefused):
        CommandTrust(keys=command_trust().keys, allow_unsigned=True).open(plain, device="dev-a")


def test_a_command_signed_by_another_key_or_altered_after_signing_is_refused():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = seal({"cmd": "set_threshold", "threshold": 0.1}, device="dev-a", key=Ed25519PrivateKey.generate())
    with pytest.raises(CommandRefused, match="does not trust for commands"):
        _open(other)
    env = json.loads(seal_command("dev-a", {"cmd": "set_threshold", "threshold": 0.1}))
    env["signed"] = env["signed"].replace("0.1", "0.9")
    with pytest.raises(CommandRefused, match="does not verify"):
        _open(json.dumps(env).encode())
    env = json.loads(seal_command("dev-a", {"cmd": "set_threshold", "threshold": 0.1}))
    env["key_id"] = "0" * 16  # a key id nobody has: the same refusal as an unknown signer
    with pytest.raises(CommandRefused, match="does not trust"):
        _open(json.dumps(env).encode())
    for broken in ({"schema": 1, "signed": 5, "key_id": "a", "sig": "b"}, {"schema": 2, "signed": "{}", "key_id": "a",
                                                                             "sig": "b"}):
        with pytest.raises(CommandRefused, match="envelope"):
            command_trust().open(broken, device="dev-a")


def test_a_command_for_another_device_is_refused():
    with pytest.raises(CommandRefused, match="addressed to device 'dev-b'"):
        _open(seal_command("dev-b", {"cmd": "set_threshold", "threshold": 0.1}))


def test_expired_future_and_overlong_commands_are_refused_and_a_fresh_one_runs():
    now = time.time()
    fresh = seal_command("dev-a", {"cmd": "set_threshold"}, ttl_s=60, now=now - 30)
    assert _open(fresh, now=now)["cmd"] == "set_threshold"
    with pytest.raises(CommandRefused, match="expired 40 s ago"):
        _open(seal_command("dev-a", {"cmd": "set_threshold"}, ttl_s=60, now=now - 100), now=now)
    with pytest.raises(CommandRefused, match="in the future"):
        _open(seal_command("dev-a", {"cmd": "set_threshold"}, ttl_s=60, now=now + 600), now=now)
    # a lifetime over a day is refused even when the signature is good (signed by hand: seal() refuses it)
    text = json.dumps({"cmd": "set_threshold", "device": "dev-a", "issued": now, "expires": now + 2 * 86400,
                       "nonce": "ab" * 16})
    env = {"schema": 1, "signed": text, "key_id": command_trust().keys[0].key_id,
           "sig": base64.b64encode(command_key().sign(text.encode())).decode()}
    with pytest.raises(CommandRefused, match="at most 86400"):
        command_trust().open(env, device="dev-a", now=now)
    with pytest.raises(ValueError):
        seal({"cmd": "x"}, device="dev-a", key=command_key(), ttl_s=2 * 86400)


def test_a_replayed_command_is_refused_also_after_a_restart(tmp_path):
    trust = command_trust().with_state(tmp_path / "seen.json")
    msg = seal_command("dev-a", {"cmd": "set_threshold", "threshold": 0.2})
    assert _open(msg, trust)["threshold"] == 0.2
    with pytest.raises(CommandRefused, match="replayed"):
        _open(msg, trust)
    restarted = command_trust().with_state(tmp_path / "seen.json")
    with pytest.raises(CommandRefused, match="replayed"):
        _open(msg, restarted)
    assert _open(seal_command("dev-a", {"cmd": "set_threshold", "threshold": 0.3}), restarted)["threshold"] == 0.3


def test_an_unreadable_replay_record_refuses_what_was_issued_before_the_start(tmp_path):
    (tmp_path / "seen.json").write_text("{not json")
    old = seal_command("dev-a", {"cmd": "set_threshold"}, now=time.time() - 5)
    trust = command_trust().with_state(tmp_path / "seen.json")
    with pytest.raises(CommandRefused, match="older than"):
        _open(old, trust)
    assert _open(seal_command("dev-a", {"cmd": "set_threshold"}, now=time.time() + 1), trust)


def test_a_full_replay_record_forgets_nonces_but_never_reopens_a_replay():
    seen = SeenCommands(None, max_entries=3)
    now = 1000.0
    for i in range(4):
        seen.check_and_add(f"n{i}", issued=now, expires=now + 10 + i, now=now)
    assert len(seen._seen) == 3 and "n0" not in seen._seen
    with pytest.raises(CommandRefused, match="older than"):
        seen.check_and_add("n0", issued=now, expires=now + 10, now=now + 1)  # forgotten, still refused
    seen.check_and_add("n9", issued=now + 2, expires=now + 20, now=now + 2)


@pytest.mark.broker
def test_on_the_broker_an_operator_unsigned_command_and_a_replay_are_refused_the_gateways_runs(
        mosquitto, tiny_cascade, tmp_path):
    """An operator login may write any topic: its unsigned command is refused; a captured signed command
    published again is refused as a replay (after a restart too); the gateway's own command runs."""
    import urllib.request

    import paho.mqtt.client as mqtt

    from tests.agent.tiny import start_gateway

    user, pw = mosquitto.admin_credentials
    op = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="operator")
    op.username_pw_set(user, pw)
    op.connect(mosquitto.host, mosquitto.port)
    op.loop_start()

    def publish(payload: bytes) -> None:
        op.publish("fleet/dev-a/cmd", payload, qos=1).wait_for_publish(5)

    captured = seal_command("dev-a", {"cmd": "set_threshold", "threshold": 0.31, "id": "cap"})
    try:
        with start_gateway(mosquitto, tiny_cascade, tmp_path) as gw:
            agent = make_agent(mosquitto, tiny_cascade.bundle_dir, "dev-a", tmp_path).start()
            try:
                before = agent.threshold
                publish(json.dumps({"schema": 1, "cmd": "set_threshold", "threshold": 0.05, "id": "plain"}).encode())
                wait_for(lambda: (agent.fleet.last_cmd or {}).get("id") == "plain", 10, "the refusal")
                assert agent.threshold == before and "not signed by the gateway" in agent.fleet.last_cmd["error"]
                publish(captured)
                wait_for(lambda: agent.threshold == 0.31, 10, "the signed command")
                agent.set_threshold(0.5)
                publish(captured)  # the same bytes again
                wait_for(lambda: "replayed" in str((agent.fleet.last_cmd or {}).get("error")), 10, "the replay refused")
                assert agent.threshold == 0.5 and agent.fleet.last_cmd["id"] == "cap"
            finally:
                agent.stop()
            with make_agent(mosquitto, tiny_cascade.bundle_dir, "dev-a", tmp_path) as agent:  # same state folder
                publish(captured)
                wait_for(lambda: "replayed" in str((agent.fleet.last_cmd or {}).get("error")), 10, "refused after restart")
                req = urllib.request.Request(f"{gw.http_url}/api/devices/dev-a/cmd", method="POST",
                                             data=json.dumps({"cmd": "set_threshold", "threshold": 0.77}).encode(),
                                             headers={"Authorization": "Bearer test-token",
                                                      "Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=10).read()
                wait_for(lambda: agent.threshold == 0.77, 10, "the gateway's command")
    finally:
        op.loop_stop()
        op.disconnect()


def test_a_device_that_trusts_no_command_key_says_at_start_that_it_will_refuse_commands(caplog):
    with caplog.at_level("WARNING", logger="edgecore.commands"):
        CommandTrust().warn_if_open("device agent dev-a")
        command_trust().warn_if_open("device agent dev-b")
    assert "dev-a trusts no command key (--command-key): every command" in caplog.text
    assert "dev-b" not in caplog.text  # a trusted key: nothing to say
