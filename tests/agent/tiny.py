"""A tiny but real student/teacher pair on digits, as ONNX, and a student bundle.

Used by the agent and gateway tests until (and besides) the shared
``tiny_run``/``onnx_bundle`` fixtures: scikit-learn fits a logistic regression
(student) and an MLP (teacher) in about a second, written as ONNX graphs
(Flatten -> Gemm [-> Relu -> Gemm]) so both sides run them with onnxruntime,
exactly as they run exported PyTorch models. The bundle follows the contract
(manifest, sha256 of every file, routing block, drift_reference.json).
"""

from __future__ import annotations

import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.confidence import confidence, fit_temperature
from edgecore.bundle import (
    SCHEMA_VERSION,
    SIGNATURE,
    TrustPolicy,
    file_entries,
    sha256_file,
)
from edgecore.spec import InputSpec


@dataclass
class TinyRun:
    root: Path
    spec: InputSpec
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray  # raw (N,1,8,8) values 0..16
    y_test: np.ndarray
    student_onnx: Path
    teacher_onnx: Path
    bundle_dir: Path
    tarball: Path


# --- signatures: one deterministic test key signs every tiny bundle; agents trust it -------------

def signing_key():
    """The tests' release key (deterministic, so cached tiny runs stay valid)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-toolchain test release key").digest())


def release_trust() -> TrustPolicy:
    from edgecore.signing import TrustedKey, key_id

    pub = signing_key().public_key()
    return TrustPolicy(keys=(TrustedKey(key_id(pub), pub),))


def command_key():
    """The tests' gateway command key (deterministic): test gateways sign commands with it, test agents trust it."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-toolchain test command key").digest())


def command_trust():
    from edgecore.commands import CommandTrust
    from edgecore.signing import TrustedKey, key_id

    pub = command_key().public_key()
    return CommandTrust(keys=(TrustedKey(key_id(pub), pub),))


def command_key_paths() -> tuple[Path, Path]:
    """(``.key`` mode 0600, ``.pub``) files of the test command key, for ``--command-key`` on command lines."""
    import os
    import tempfile

    from cryptography.hazmat.primitives import serialization

    k = command_key()
    folder = Path(tempfile.gettempdir()) / f"edge-toolchain-test-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    key, pub = folder / "command.key", folder / "command.pub"
    if not key.exists():
        tmp = folder / f"command.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
        os.replace(tmp, key)
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def seal_command(device_id: str, cmd: dict, **kw) -> bytes:
    """``cmd`` for ``device_id`` signed with the test command key, as the gateway sends it."""
    from edgecore.commands import seal

    return seal(cmd, device=device_id, key=command_key(), **kw)


def release_pub_path() -> Path:
    """The test key's .pub file, for ``--trust-key`` on the command lines."""
    import tempfile

    from cryptography.hazmat.primitives import serialization

    p = Path(tempfile.gettempdir()) / "edge-toolchain-test-release.pub"
    p.write_bytes(signing_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def sign_dir(bundle_dir: Path) -> None:
    from edgecore.signing import sign

    (bundle_dir / SIGNATURE).write_bytes(sign((bundle_dir / "manifest.json").read_bytes(), signing_key()))


def _gemm_onnx(path: Path, layers: list[tuple[np.ndarray, np.ndarray]], sample_shape: tuple[int, ...]) -> None:
    """Layers as (W of shape (in, out), b)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["input"], ["h0"], axis=1)]
    inits = []
    cur = "h0"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), f"W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"B{i}")]
        out = "logits" if i == len(layers) - 1 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [out]))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            cur = f"r{i}"
    n_out = layers[-1][1].shape[0]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *sample_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _hist(values: np.ndarray, lo: float, hi: float, bins: int = 20) -> dict[str, list[float]]:
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    rng = np.random.default_rng(0)
    sample = rng.choice(values, size=min(1000, len(values)), replace=False)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "sample": sample.tolist()}


def build_tiny(root: Path, *, offload_budget: float = 0.10) -> TinyRun:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    root.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N,1,8,8), 0..16
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, va, te = idx[:1077], idx[1077:1437], idx[1437:]
    scaled = x[tr] / 16.0
    spec = InputSpec("input", (None, 1, 8, 8), scale=1 / 16, mean=(float(scaled.mean()),), std=(float(scaled.std()),))
    f = lambda a: spec.preprocess(a).reshape(len(a), -1)  # noqa: E731
    student = LogisticRegression(C=0.05, max_iter=300).fit(f(x[tr]), y[tr])
    with warnings.catch_warnings():  # a converged-enough MLP in well under a second
        warnings.simplefilter("ignore")
        teacher = MLPClassifier(hidden_layer_sizes=(128,), max_iter=80, random_state=0).fit(f(x[tr]), y[tr])
    s_path, t_path = root / "student.onnx", root / "teacher.onnx"
    _gemm_onnx(s_path, [(student.coef_.T, student.intercept_)], (1, 8, 8))
    _gemm_onnx(t_path, list(zip(teacher.coefs_, teacher.intercepts_)), (1, 8, 8))
    labels = [str(i) for i in range(10)]
    (root / "data.json").write_text(json.dumps({"source": "digits", "labels": labels, "input_spec": spec.to_dict()}))

    # routing: temperature on val, threshold = confidence quantile at the offload budget
    val_logits = student.decision_function(f(x[va])).astype(np.float32)
    temp = float(fit_temperature(val_logits, y[va]))
    conf = confidence(val_logits, measure="max_prob", temperature=temp)
    threshold = float(np.quantile(conf, offload_budget))
    bdir = root / "bundle"
    bdir.mkdir(exist_ok=True)
    (bdir / "model.onnx").write_bytes(s_path.read_bytes())
    flat = x[va].reshape(len(va), -1)
    drift_ref = {
        "schema_version": 1,
        "confidence": _hist(conf, 0.0, 1.0),
        "features": {"mean": _hist(flat.mean(1), 0.0, 16.0), "std": _hist(flat.std(1), 0.0, 16.0)},
        "measure": "max_prob", "temperature": temp, "n": int(len(va)),
    }
    (bdir / "drift_reference.json").write_text(json.dumps(drift_ref))
    manifest = {
        "schema_version": SCHEMA_VERSION, "task": {"name": "classify", "params": {}},
        "model": {"name": "tiny-digits", "version": "1"},
        "target": "onnx", "precision": "fp32", "toolchain_version": "test", "created": "2026-01-01T00:00:00Z",
        "input": spec.to_dict(), "output": {"name": "logits", "labels": labels},
        "artifact": {"main": "model.onnx", "runtime": "onnxruntime", "runtime_version": None, "details": {}},
        "files": {k: e.to_dict() for k, e in file_entries(bdir, ["model.onnx", "drift_reference.json"]).items()},
        "metrics": {"accuracy": float(student.score(f(x[te]), y[te]))},
        "routing": {"measure": "max_prob", "temperature": temp, "threshold": threshold,
                    "offload_budget": offload_budget, "expected_offload": offload_budget},
        "calibration": None, "lineage": {}, "drift_reference": "drift_reference.json",
    }
    (bdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sign_dir(bdir)
    with tarfile.open(root / "bundle.tar.gz", "w:gz") as tf:
        tf.add(bdir, arcname="bundle")
    np.savez(root / "splits.npz", x_val=x[va], y_val=y[va], x_test=x[te], y_test=y[te])
    return load_tiny(root)


def load_tiny(root: Path) -> TinyRun:
    """Reopen what `build_tiny` wrote (the fixture caches it across sessions)."""
    spec = InputSpec.from_dict(json.loads((root / "data.json").read_text())["input_spec"])
    d = np.load(root / "splits.npz")
    return TinyRun(root, spec, d["x_val"], d["y_val"], d["x_test"], d["y_test"], root / "student.onnx",
                   root / "teacher.onnx", root / "bundle", root / "bundle.tar.gz")


def tarball_sha(run: TinyRun) -> str:
    return sha256_file(run.tarball)


def retag_bundle(src: Path, dst: Path, *, version: str, model_bytes: bytes | None = None,
                 name: str | None = None, release: int | None = None) -> Path:
    """A copy of a bundle with another model version (and optionally another model file, another model name:
    another model line, or a release number), re-hashed + tarred."""
    import shutil

    shutil.copytree(src, dst)
    if model_bytes is not None:
        (dst / "model.onnx").write_bytes(model_bytes)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"]["version"] = version
    if name is not None:
        m["model"]["name"] = name
    if release is not None:
        m["model"]["release"] = release
    m["files"] = {k: e.to_dict() for k, e in file_entries(dst, ["model.onnx", "drift_reference.json"]).items()}
    (dst / "manifest.json").write_text(json.dumps(m))
    sign_dir(dst)
    tar = dst.parent / f"{dst.name}.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(dst, arcname=dst.name)
    return tar


# --- harness: a gateway and agents wired to the test broker -------------------------------------

def start_gateway(broker, run: TinyRun, tmp: Path, *, replica: str = "gw-0", http: bool = True,
                  batch_ms: float = 5.0, token: str | None = "test-token", db: str | None = None,
                  mqtt_version: str = "5", collect=None, **worker):
    from cloud_gateway.config import CollectionPolicy, GatewayConfig, WorkerConfig
    from cloud_gateway.service import Gateway

    user, pw = broker.gateway_credentials
    cfg = GatewayConfig(
        worker=WorkerConfig(broker_url=broker.url, username=user, password=pw, replica_id=replica,
                            batch_ms=batch_ms, mqtt_version=mqtt_version, **worker),
        teacher=run.teacher_onnx, db=db or str(tmp / "gateway.sqlite"), bundles_dir=tmp / "bundles",
        http_port=0 if http else None, token=token, threads=1, trust=release_trust(),
        collect=collect or CollectionPolicy(), command_key=command_key_paths()[0],
    )
    return Gateway(cfg).start()


def make_agent(broker, bundle, device_id: str, tmp: Path, *, commands=None, **overrides):
    """An agent on the test broker; ``commands`` adds handlers (e.g. hw_bench's ``bench``, see `bench_commands`)."""
    from device_agent.agent import Agent, AgentConfig

    user, pw = broker.credentials(device_id)
    kw = dict(deadline_s=0.5, telemetry_window_s=0.2, state_dir=tmp / f"agent-{device_id}", threads=1,
              trust=release_trust(), command_trust=command_trust())
    kw.update(overrides)
    cfg = AgentConfig(device_id=device_id, broker_url=broker.url, username=user, password=pw, **kw)
    return Agent(bundle, cfg, commands=commands)


def bench_commands() -> dict:
    """hw_bench's ``bench`` agent command, passed explicitly.

    It is registered under the ``edge_toolchain.agent_commands`` entry point;
    passing it keeps the tests independent of whether the editable install's
    metadata was refreshed since the entry point was added.
    """
    from hw_bench.job import agent_command

    return {"bench": agent_command}


def items(x: np.ndarray, y: np.ndarray | None = None):
    from device_agent.sources import Item

    return [Item(str(i), x[i], None if y is None else int(y[i])) for i in range(len(x))]


class Listener:
    """An admin MQTT client that records what arrives on some topics (for assertions)."""

    def __init__(self, broker, topics: list[str], *, client_id: str = "listener", persistent: bool = False,
                 creds: tuple[str, str] | None = None) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.suback: list[object] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(*(creds or broker.admin_credentials))
        self._topics = topics

        def on_connect(c, u, f, rc, p):
            if not rc.is_failure:
                c.subscribe([(t, 1) for t in topics])

        def on_subscribe(c, u, mid, rcs, p):
            self.suback = list(rcs)
            self.ready.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError("listener could not subscribe")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(pred, timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
