"""No downgrade: a device refuses a lower release of its model line than one it ran (a signed old bundle stays
validly signed for ever), except a rollback the gateway orders to a bundle it ran before; the history survives a
restart. And a device cannot order itself anything: the broker's ACL keeps it off its own command topic
(tests/gateway/test_gateway.py::test_acl_device_cannot_act_as_another)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.updates import ReleaseHistory
from edgecore.bundle import open_bundle
from edgecore.errors import BundleTrustError
from tests.agent.tiny import release_trust, retag_bundle


@pytest.fixture
def releases(tiny_cascade, tmp_path) -> dict[str, Path]:
    out = {}
    for name, rel in (("r2", 2), ("r3", 3), ("r5", 5)):
        retag_bundle(tiny_cascade.bundle_dir, tmp_path / name, version=name, release=rel)
        out[name] = tmp_path / name
    retag_bundle(tiny_cascade.bundle_dir, tmp_path / "plain", version="plain")  # unnumbered
    out["plain"] = tmp_path / "plain"
    return out


def test_the_history_refuses_a_downgrade_but_not_an_ordered_rollback(releases, tmp_path):
    h = ReleaseHistory(tmp_path / "state" / "releases.json")
    b = {k: open_bundle(v) for k, v in releases.items()}
    for name in ("r3", "r5"):
        h.check(b[name], rollback=False, what=name)
        h.record(b[name])
    assert h.highest == {"tiny-digits": 5}
    with pytest.raises(BundleTrustError, match=r"bundle r3 is release 3 of model line tiny-digits, below release 5 "
                                               r"this device ran: refused \(a downgrade"):
        h.check(b["r3"], rollback=False, what="r3")
    h.check(b["r3"], rollback=True, what="r3")  # ran before, and the gateway says it is a rollback
    with pytest.raises(BundleTrustError, match="below release 5"):
        h.check(b["r2"], rollback=True, what="r2")  # a "rollback" to a bundle it never ran is a downgrade
    with pytest.raises(BundleTrustError, match="an unnumbered release of model line tiny-digits"):
        h.check(b["plain"], rollback=False, what="plain")
    again = ReleaseHistory(tmp_path / "state" / "releases.json")  # a restart remembers
    assert again.highest == {"tiny-digits": 5} and again.ran == h.ran
    with pytest.raises(BundleTrustError):
        again.check(b["r3"], rollback=False, what="r3")


def test_the_agent_refuses_an_older_release_by_command_and_after_a_restart(releases, tmp_path, monkeypatch):
    """The whole command path: ``update_bundle`` to a lower release fails with the reason in ``last_cmd`` and the
    running bundle stays; ``rollback: true`` to one it ran passes; a new agent on the same state dir remembers."""
    import itertools
    import shutil

    from device_agent.agent import Agent, AgentConfig

    n = itertools.count()

    def _fetched(src: Path):  # what `Agent.fetch` does after the download: a copy of its own in the state dir
        dst = tmp_path / "state" / f"fetched-{next(n)}"
        shutil.copytree(src, dst)
        return open_bundle(dst)

    def agent() -> Agent:
        a = Agent(releases["r3"], AgentConfig(device_id="dev-a", broker_url="mqtt://127.0.0.1:1", threads=1,
                                              state_dir=tmp_path / "state", trust=release_trust()))
        monkeypatch.setattr(a, "fetch", lambda url, sha256=None: _fetched(releases[url.rsplit("/", 1)[-1]]))
        monkeypatch.setattr(a.fleet, "publish_status", lambda *x, **k: None)  # (not started: no broker)
        return a

    a = agent()
    assert a.fleet.handle_command({"cmd": "update_bundle", "url": "http://gw/api/bundles/r5"})["ok"]
    assert a.bundle.manifest.model.release == 5
    out = a.fleet.handle_command({"cmd": "update_bundle", "url": "http://gw/api/bundles/r3"})
    assert not out["ok"] and "below release 5 this device ran: refused" in out["error"]
    assert a.bundle.manifest.model.release == 5
    out = a.fleet.handle_command({"cmd": "update_bundle", "url": "http://gw/api/bundles/r3", "rollback": True})
    assert out["ok"] and a.bundle.manifest.model.release == 3
    out = a.fleet.handle_command({"cmd": "update_bundle", "url": "http://gw/api/bundles/r2", "rollback": "yes"})
    assert not out["ok"] and "'rollback' must be true or false" in out["error"]
    b = agent()  # restarted (on r3, as the operator started it): it still knows release 5 ran
    out = b.fleet.handle_command({"cmd": "update_bundle", "url": "http://gw/api/bundles/r2"})
    assert not out["ok"] and "below release 5" in out["error"]
