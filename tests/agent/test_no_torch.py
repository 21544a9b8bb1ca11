"""The device side must never import torch or tensorflow, even indirectly."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import device_agent


def test_device_agent_imports_no_torch_or_tensorflow():
    names = sorted(f"device_agent.{m.name}" for m in pkgutil.iter_modules(device_agent.__path__))
    assert {"device_agent.agent", "device_agent.cli", "device_agent.cloud"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "import calibration.confidence, targets.onnx_target, edgecore.mqtt\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'tf_keras'))\n"
        "print(len(sys.modules)); assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
