"""Measured latency of a candidate student: the real artifact, built for the target and timed on the device.

`LatencyMeter.measure(model)` exports the PyTorch model to ONNX, builds the
artifact of ``prune.latency_target`` (e.g. ``onnx-fp32``, ``openvino-int8``)
with that target's own builder (int8: post-training quantization on the run's
representative set, the same graph structure a QAT student exports to), loads
it with the target's runner, the same code path the agent and ``hw-bench run``
use, and times single-stream queries (batch 1, `edgecore.timing.timed_loop`).

Measurements are cached by the sha256 of the artifact's files (plus target,
precision, threads and device) in ``RUN/latency/cache.json``: the same
candidate is never measured twice.

One timing on a loaded machine (or a throttling device) can be off by 2×, so
the search does not trust single readings: `LatencyMeter.compare` times the
unpruned reference and a candidate back to back in ``rounds`` interleaved
rounds (the order alternating), and the candidate's latency is its per-round
ratio to the reference: a slow round slows both. The comparison is cached by
both artifacts' sha256 and the round count. A ``latency_device`` other than ``local``
is a fleet device id: a registered device measurer (entry-point group
``edge_toolchain.latency_devices``; hw-bench registers ``fleet``, which sends
the agent's ``bench`` command over MQTT) measures there, so the toolchain never
imports the layers above it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgecore.errors import CompressionError, ConfigError
from edgecore.fsutil import atomic_write_json
from edgecore.timing import timed_loop

DEVICE_GROUP = "edge_toolchain.latency_devices"

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from edgecore.representative import RepresentativeSet
    from edgecore.spec import InputSpec

def parse_latency_target(spec: str) -> tuple[str, str]:
    """``"openvino-int8"`` -> ("openvino", "int8"); a clear ConfigError otherwise."""
    from targets import get_target

    name, _, precision = spec.rpartition("-")
    if not name or not precision:
        raise ConfigError(f"prune.latency_target: expected TARGET-PRECISION such as 'onnx-fp32', got {spec!r}")
    t = get_target(name)
    if precision not in {p.value for p in t.precisions}:
        raise ConfigError(f"prune.latency_target: {name} has no precision {precision!r} "
                          f"(it builds {', '.join(p.value for p in t.precisions)})")
    return name, precision


def _files_sha256(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.relative_to(root).as_posix().encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Prepared:
    """A candidate's artifact, built once and kept until `LatencyMeter.release`, so it can be timed in rounds."""

    name: str
    sha256: str
    art_dir: Path
    info: Any
    built: tuple[Any, Any]


@dataclass
class LatencyMeter:
    """Builds and times candidates for one target/precision on one device; caches by artifact hash."""

    target: str
    precision: str
    input_spec: "InputSpec"
    labels: tuple[str, ...]
    calibration: "RepresentativeSet | None"
    samples: np.ndarray  # preprocessed inputs to time with (a few are enough)
    cache_path: Path | None = None
    device: str = "local"
    percentile: float = 50.0
    threads: int = 2
    min_queries: int = 200
    min_seconds: float = 0.5
    warmup: int = 20
    opset: int = 18
    fleet: dict[str, Any] = field(default_factory=dict)  # broker, credentials, gateway, sign_key... (fleet devices)
    measured: int = 0  # how many candidates were actually built and timed (cache misses)
    _cache: dict[str, Any] = field(default_factory=dict)
    _runners: dict[Path, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_path is not None and self.cache_path.exists():
            try:
                self._cache = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                self._cache = {}  # an unreadable cache is only a cache: measure again

    def measure(self, model: "nn.Module", *, name: str = "candidate") -> dict[str, Any]:
        """Build ``model``'s artifact and time it; returns p50/pXX in ms, the artifact sha256, ``cached``."""
        with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
            art_dir, info, sha, built = self._build(model, Path(tmp), name)
            key = f"{sha}|{self.target}-{self.precision}|t{self.threads}|{self.device}"
            hit = self._cache.get(key)
            if hit is not None:
                return {**hit, "cached": True}
            lat = self._time(art_dir, info) if self.device == "local" else self._remote(art_dir, built)
            self._runners.pop(art_dir, None)
        self.measured += 1
        rec = {"sha256": sha, "p50_ms": float(np.percentile(lat, 50)),
               "pxx_ms": float(np.percentile(lat, self.percentile)), "percentile": self.percentile,
               "queries": int(lat.size), "device": self.device, "threads": self.threads}
        self._cache[key] = rec
        if self.cache_path is not None:
            atomic_write_json(self.cache_path, self._cache)
        return {**rec, "cached": False}

    def prepare(self, model: "nn.Module", *, name: str = "candidate") -> Prepared:
        """Build ``model``'s artifact into a folder of its own (removed by `release`)."""
        tmp = Path(tempfile.mkdtemp(prefix="latency-"))
        try:
            art_dir, info, sha, built = self._build(model, tmp, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Prepared(name=name, sha256=sha, art_dir=art_dir, info=info, built=built)

    def release(self, prep: Prepared) -> None:
        self._runners.pop(prep.art_dir, None)
        shutil.rmtree(prep.art_dir.parent, ignore_errors=True)

    def time_once(self, prep: Prepared) -> tuple[float, float]:
        """One timing of ``prep``: (p50, pXX) in ms."""
        lat = self._time(prep.art_dir, prep.info) if self.device == "local" else self._remote(prep.art_dir, prep.built)
        return float(np.percentile(lat, 50)), float(np.percentile(lat, self.percentile))

    def compare(self, reference: Prepared, candidate: Prepared, *, rounds: int,
                use_cache: bool = True) -> dict[str, Any]:
        """Time ``reference`` and ``candidate`` back to back in ``rounds`` rounds (the order alternating).

        Returns the per-round p50/pXX of both (``ref_p50``, ``ref_pxx``, ``p50``, ``pxx``, ms) and the
        per-round ratios candidate/reference (``ratios``, at the percentile; ``p50_ratios``). The same
        artifact as the reference is timed once per round, its ratio 1. ``use_cache=False`` always times
        (a re-measure) and leaves the cache alone."""
        key = (f"{candidate.sha256}|ref:{reference.sha256}|r{rounds}|p{self.percentile:g}|"
               f"{self.target}-{self.precision}|t{self.threads}|{self.device}")
        hit = self._cache.get(key) if use_cache else None
        if hit is not None:
            return {**hit, "cached": True}
        same = candidate.sha256 == reference.sha256
        ref: list[tuple[float, float]] = []
        cand: list[tuple[float, float]] = []
        for r in range(rounds):
            if same:
                ref.append(self.time_once(reference))
                cand.append(ref[-1])
            elif r % 2 == 0:
                ref.append(self.time_once(reference))
                cand.append(self.time_once(candidate))
            else:
                cand.append(self.time_once(candidate))
                ref.append(self.time_once(reference))
        if use_cache:
            self.measured += 1
        rec = {"sha256": candidate.sha256, "reference_sha256": reference.sha256, "rounds": rounds,
               "percentile": self.percentile, "device": self.device, "threads": self.threads,
               "ref_p50": [a for a, _ in ref], "ref_pxx": [b for _, b in ref],
               "p50": [a for a, _ in cand], "pxx": [b for _, b in cand],
               "p50_ratios": [c[0] / max(f[0], 1e-12) for c, f in zip(cand, ref)],
               "ratios": [c[1] / max(f[1], 1e-12) for c, f in zip(cand, ref)]}
        if use_cache:
            self._cache[key] = rec
            if self.cache_path is not None:
                atomic_write_json(self.cache_path, self._cache)
        return {**rec, "cached": False}

    def _build(self, model: "nn.Module", tmp: Path, name: str) -> tuple[Path, Any, str, tuple[Any, Any]]:
        import copy

        from edgecore.spec import Precision
        from targets import get_target
        from targets.base import ModelSource
        from toolchain.export import export_onnx

        model = copy.deepcopy(model).cpu().eval()
        onnx_path = tmp / "model.onnx"
        export_onnx(model, onnx_path, input_shape=self.input_spec.sample_shape, opset=self.opset)
        source = ModelSource(name=name, input_spec=self.input_spec, labels=self.labels, onnx_fp32=onnx_path,
                             torch_model=lambda: model)
        out = tmp / "artifact"
        out.mkdir()
        t = get_target(self.target)
        try:
            artifact = t.build(source, Precision(self.precision), self.calibration, out)
        except Exception as e:  # a converter failure names the candidate, not a traceback
            raise CompressionError(f"latency search: building {name} for {self.target}-{self.precision} failed: "
                                   f"{type(e).__name__}: {e}") from e
        info = artifact.info(t.runtime_version())
        return out, info, _files_sha256(out, artifact.files), (artifact, source)

    def _time(self, art_dir: Path, info: Any) -> np.ndarray:
        from targets import get_target

        runner = self._runners.get(art_dir)
        if runner is None:
            runner = get_target(self.target).load(art_dir, info, self.input_spec, threads=self.threads)
            self._runners[art_dir] = runner
        batches = [np.ascontiguousarray(self.samples[i:i + 1]) for i in range(min(16, len(self.samples)))]
        lat, _ = timed_loop(runner.run, batches, min_s=self.min_seconds, min_q=self.min_queries,
                            max_s=max(30.0, self.min_seconds * 4), warmup=self.warmup)
        return lat

    def _remote(self, art_dir: Path, built: tuple[Any, Any]) -> np.ndarray:
        measure = device_measurer()
        artifact, source = built
        return np.asarray(measure(
            device=self.device, artifact_dir=art_dir, artifact=artifact, source=source, calibration=self.calibration,
            threads=self.threads, min_queries=self.min_queries, min_seconds=self.min_seconds, warmup=self.warmup,
            options=self.fleet), dtype=np.float64)


def device_measurer() -> Callable[..., Any]:
    """The registered fleet-device measurer (hw-bench's), or a ConfigError saying what to install."""
    from importlib import metadata

    for ep in metadata.entry_points(group=DEVICE_GROUP):
        return ep.load()  # type: ignore[no-any-return]
    raise ConfigError(f"prune.latency_device names a fleet device, but no device measurer is installed (entry-point "
                      f"group {DEVICE_GROUP}): pip install 'edge-toolchain[bench]', or use latency_device = 'local'")
