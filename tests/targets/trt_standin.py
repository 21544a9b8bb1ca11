"""STAND-IN of the TensorRT Python API -- NOT TensorRT.

TensorRT cannot run on machines without an NVIDIA GPU, so the
engine builder's calls into TensorRT are tested against this small imitation
of the TensorRT 10 classes it uses (Logger, Builder, NetworkDefinition,
OnnxParser, IBuilderConfig, IOptimizationProfile, BuilderFlag, MemoryPoolType).
It records every call, parses the ONNX with the real ``onnx`` package (so a
broken graph fails like the real parser), and "serializes" a JSON description
instead of an engine. Nothing here runs a network.
"""

from __future__ import annotations

import enum
import json
from typing import Any

__version__ = "10.99.0-standin"
IS_STANDIN = True
CALLS: list[tuple[str, Any]] = []


class Logger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinition:
    def __init__(self) -> None:
        self.ops: list[str] = []
        self.inputs: list[str] = []


class OnnxParser:
    def __init__(self, network: NetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    def parse(self, data: bytes) -> bool:
        import onnx

        CALLS.append(("parse", len(data)))
        try:
            model = onnx.load_from_string(data)
            onnx.checker.check_model(model)
        except Exception as e:
            self.errors.append(f"ModelImporter: {e}")
            return False
        self.network.ops = [n.op_type for n in model.graph.node]
        self.network.inputs = [i.name for i in model.graph.input]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, mn: tuple[int, ...], opt: tuple[int, ...], mx: tuple[int, ...]) -> None:
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.pools: dict[str, int] = {}
        self.profiles: list[OptimizationProfile] = []

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag.name)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool.name] = size

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    fail_build = False  # a test sets this to imitate TensorRT returning None

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> NetworkDefinition:
        CALLS.append(("create_network", flags))
        return NetworkDefinition()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: NetworkDefinition, config: BuilderConfig) -> bytes | None:
        CALLS.append(("build", sorted(config.flags)))
        if Builder.fail_build:
            return None
        for name, _ in ((p, s) for prof in config.profiles for p, s in prof.shapes.items()):
            if name not in network.inputs:
                return None  # real TensorRT errors on a profile for an unknown input
        return json.dumps({"standin_engine": True, "flags": sorted(config.flags), "pools": config.pools,
                           "profiles": [{k: v for k, v in p.shapes.items()} for p in config.profiles],
                           "ops": network.ops}).encode()
