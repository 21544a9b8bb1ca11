"""A small synthetic bundle (no runtime needed): the contract alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecore.bundle import write_bundle, write_tarball
from edgecore.manifest import ArtifactInfo, Manifest, ModelInfo, OutputSpec, Routing
from edgecore.spec import InputSpec, Precision


def make_manifest(**over) -> Manifest:
    kw = dict(
        model=ModelInfo("tiny", "1"), target="onnx", precision=Precision.FP32,
        input=InputSpec("input", (None, 1, 8, 8), scale=1 / 16, mean=(0.5,), std=(0.25,)),
        output=OutputSpec("logits", tuple(str(i) for i in range(10))),
        artifact=ArtifactInfo(main="model.onnx", runtime="onnxruntime"),
        routing=Routing(threshold=0.7, temperature=1.5, offload_budget=0.1), drift_reference="drift_reference.json",
    )
    kw.update(over)
    return Manifest(**kw)


def make_bundle(root: Path, *, signing_key=None, payload: bytes = b"\x08fake-onnx" * 100, **over) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(payload)
    (root / "drift_reference.json").write_text(json.dumps({"measure": "max_prob", "temperature": 1.5}))
    write_bundle(root, make_manifest(**over), signing_key=signing_key)
    write_tarball(root)
    return root


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b" / "onnx-fp32")
