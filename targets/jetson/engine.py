"""Build and cache TensorRT engines on the device.

A TensorRT engine is specific to the GPU model and TensorRT version that built
it, so the cache key is ``(gpu model, TensorRT version, ONNX sha256, recipe)``;
a device never loads an engine made elsewhere. The TensorRT module is passed in
(``trt=``) so that the same code is exercised by the tests against a small,
clearly labelled stand-in of the TensorRT API (``tests/targets/trt_standin.py``)
on machines without an NVIDIA GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgecore.errors import BuildError, TargetUnavailableError
from edgecore.fsutil import atomic_write_bytes, atomic_write_json

DEFAULT_CACHE = Path(os.environ.get("EDGE_TRT_CACHE", Path.home() / ".cache" / "edge-toolchain" / "trt"))


def gpu_model() -> str:
    """The GPU's name: the Jetson module from the device tree, else CUDA's device 0."""
    dt = Path("/proc/device-tree/model")
    if dt.is_file():
        return dt.read_text(errors="replace").strip("\x00\n ")
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef, unused-ignore]  # with cuda-python installed
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).strip("\x00 ")
    except ImportError:
        pass
    raise TargetUnavailableError("cannot identify the NVIDIA GPU (no Jetson device tree, no cuda-python); pip install cuda-python")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()


@dataclass(frozen=True)
class EngineKey:
    gpu: str
    trt_version: str
    onnx_sha256: str
    recipe_sha256: str

    @property
    def filename(self) -> str:
        return f"{_slug(self.gpu)}__trt{_slug(self.trt_version)}__{self.onnx_sha256[:16]}-{self.recipe_sha256[:8]}.engine"


def engine_key(*, onnx_path: Path, recipe: dict[str, Any], gpu: str, trt_version: str) -> EngineKey:
    h = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    build_part = {k: recipe[k] for k in ("precision", "builder_flags", "workspace_mib", "profile", "input")}
    r = hashlib.sha256(json.dumps(build_part, sort_keys=True).encode()).hexdigest()
    return EngineKey(gpu=gpu, trt_version=trt_version, onnx_sha256=h, recipe_sha256=r)


def build_engine(onnx_path: Path, recipe: dict[str, Any], *, trt: Any) -> bytes:
    """Serialized engine for ``onnx_path`` following ``recipe``, with the TensorRT 10 API."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors or ["unknown error"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(recipe["workspace_mib"]) << 20)
    for flag in recipe["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    p = recipe["profile"]
    profile.set_shape(recipe["input"], tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build an engine from {onnx_path} ({recipe['precision']})")
    return bytes(serialized)


class EngineCache:
    """Engines on disk keyed by `EngineKey`; builds on a miss, atomically."""

    def __init__(self, root: Path = DEFAULT_CACHE, *, trt: Any, gpu: Callable[[], str] = gpu_model) -> None:
        self.root = Path(root)
        self.trt = trt
        self._gpu = gpu

    def key(self, onnx_path: Path, recipe: dict[str, Any]) -> EngineKey:
        return engine_key(onnx_path=onnx_path, recipe=recipe, gpu=self._gpu(), trt_version=str(self.trt.__version__))

    def get(self, onnx_path: Path, recipe: dict[str, Any]) -> tuple[Path, bool]:
        """(engine path, built now?)."""
        key = self.key(onnx_path, recipe)
        path = self.root / key.filename
        if path.is_file() and path.stat().st_size > 0:
            return path, False
        data = build_engine(onnx_path, recipe, trt=self.trt)
        atomic_write_bytes(path, data)
        atomic_write_json(path.with_suffix(".json"), {"gpu": key.gpu, "tensorrt": key.trt_version,
                                                       "onnx_sha256": key.onnx_sha256, "recipe": recipe})
        return path, True
