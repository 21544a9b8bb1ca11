"""docs/wire.md's worked example, run as written against a real Mosquitto and gateway."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgecore import wire
from tests.agent.tiny import start_gateway

pytestmark = pytest.mark.broker
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire.md"


def _example() -> str:
    text = DOC.read_text()
    block = re.search(r"<!-- wire-example:start -->\s*```bash\n(.*?)```\s*<!-- wire-example:end -->", text, re.S)
    assert block, "docs/wire.md lost its wire-example block"
    return block.group(1)


def test_the_documented_mosquitto_example_gets_an_answer(mosquitto, tiny_cascade, tmp_path):
    if not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")):
        pytest.skip("mosquitto-clients is not installed (apt-get install mosquitto-clients)")
    with start_gateway(mosquitto, tiny_cascade, tmp_path, http=False) as gw:
        env = {**os.environ, "BROKER_HOST": mosquitto.host, "BROKER_PORT": str(mosquitto.port),
               "DEVICE_PASSWORD": mosquitto.credentials("dev-a")[1]}
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", _example()], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout.strip().splitlines()[-1])
        # the doc's hand-built bytes are exactly what the project's encoder writes
        assert (tmp_path / "req.bin").read_bytes() == wire.encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
        assert (tmp_path / "req.bin").stat().st_size == 280  # the size the doc states
        expected = int(gw.teacher.run(np.zeros((1, 1, 8, 8), np.float32)).argmax())
    assert reply["ok"] is True and reply["schema"] == 1
    assert reply["prediction"] == expected and bytes.fromhex(reply["correlation"]) == b"req-1"
    assert len(reply["probabilities"]) == 10 and abs(sum(reply["probabilities"]) - 1) < 1e-4
