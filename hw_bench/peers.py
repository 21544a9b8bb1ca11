"""``hw-bench peers``: our INT8 beside each runtime's own quantizer, on the same fp32 model, measured side by side.

The goal for every runtime: our int8 artifact is at least as fast as the one its vendor's quantizer makes from the
same fp32 model with the same representative set, at equal or better accuracy. The peers, each with its tool's
defaults except where noted:

* ``onnx``: ONNX Runtime's ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel weights; its default
  int8 activations and weights, MinMax calibration, full-range weights).
* ``openvino``: NNCF's ``nncf.quantize`` on the fp32 IR (its default preset).
* ``tflite``: the full-integer path of the converter installed here. TensorFlow's ``TFLiteConverter`` needs a
  TensorFlow model (it cannot read ONNX or PyTorch), so the peer is litert-torch's documented pt2e recipe
  (symmetric, per-channel weights, static activations) from the PyTorch model the ONNX was exported from.

Ours is the bundle the toolchain builds (``Target.build``; built here when absent). Every contender runs through
`bench.measure` in the same interleaved rounds; "ours over peer" is `ratios.paired` of their per-round scores. A
peer whose tool is missing or fails is a row that says why; it is never replaced by something else.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from edgecore.errors import BenchError, EdgeError
from targets.base import ModelSource, Runner, first_missing

from .bench import Contender, bundle_contender, inputs_for, measure, random_inputs
from .data import TestData
from .envinfo import StealMeter, environment, load_average
from .loadgen import Settings
from .ratios import Ratio, paired

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

log = logging.getLogger(__name__)
DEFAULT_THREADS = 2
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PeerInput:
    """One fp32 model, its representative set, where our int8 bundles live (or will), and its test data."""

    source: ModelSource
    calibration: "RepresentativeSet"
    ours: dict[str, Path]  # target name -> our int8 bundle directory
    build_ours: Callable[[str], Path]  # builds our int8 bundle for a target (when absent)
    data: TestData | None
    origin: str


class Peer(abc.ABC):
    """A runtime's own quantizer: builds an int8 artifact from the fp32 model and runs it on that runtime."""

    target: ClassVar[str]
    tool: ClassVar[str]
    recipe: ClassVar[str]
    suffix: ClassVar[str]

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]: ...

    @abc.abstractmethod
    def build(self, src: PeerInput, out_dir: Path) -> Path:
        """The int8 artifact's main file in ``out_dir``."""

    @abc.abstractmethod
    def load(self, path: Path, *, threads: int | None) -> Runner: ...


class OrtQuantizeStatic(Peer):
    target = "onnx"
    tool = "onnxruntime.quantization.quantize_static"
    recipe = "quant_pre_process, then QDQ, per-channel; defaults otherwise (s8/s8, MinMax, full-range weights)"
    suffix = "model.onnx"

    def available(self) -> tuple[bool, str]:
        missing = first_missing(("onnxruntime.quantization", "pip install onnxruntime"), ("onnx", "pip install onnx"))
        return (False, missing) if missing else (True, "onnxruntime present")

    def build(self, src: PeerInput, out_dir: Path) -> Path:
        import onnx
        from onnxruntime.quantization import QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from targets.calibration_data import ort_data_reader

        fp32 = Path(src.source.onnx_fp32)
        pre, dst = out_dir / "fp32.pre.onnx", out_dir / self.suffix
        quant_pre_process(str(fp32), str(pre))
        name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
        quantize_static(str(pre), str(dst), ort_data_reader(src.calibration, input_name=name),
                        quant_format=QuantFormat.QDQ, per_channel=True)
        pre.unlink(missing_ok=True)
        return dst

    def load(self, path: Path, *, threads: int | None) -> Runner:
        from targets._ort import OrtRunner

        return OrtRunner(path, threads=threads)


class NncfQuantize(Peer):
    target = "openvino"
    tool = "nncf.quantize"
    recipe = "fp32 IR from the ONNX (openvino.convert_model), nncf.quantize with its defaults"
    suffix = "model.xml"

    def available(self) -> tuple[bool, str]:
        missing = first_missing(("openvino", "pip install openvino"), ("nncf", "pip install nncf"))
        return (False, missing) if missing else (True, "openvino and nncf present")

    def build(self, src: PeerInput, out_dir: Path) -> Path:
        import nncf
        import openvino as ov

        from targets.calibration_data import nncf_dataset

        model = nncf.quantize(ov.convert_model(str(src.source.onnx_fp32)), nncf_dataset(src.calibration))
        dst = out_dir / self.suffix
        ov.save_model(model, str(dst), compress_to_fp16=False)
        return dst

    def load(self, path: Path, *, threads: int | None) -> Runner:
        from targets.openvino_target import OpenVinoRunner

        return OpenVinoRunner(path, threads=threads)


class LiteRtFullInteger(Peer):
    target = "tflite"
    tool = "litert-torch pt2e (full integer)"
    recipe = ("litert-torch's documented recipe: PT2EQuantizer, symmetric per-channel weights, static activations, "
              "calibrated, convert_pt2e, litert_torch.convert with the quantizer (tensorflow's TFLiteConverter "
              "cannot read a PyTorch or ONNX model)")
    suffix = "model.tflite"

    def available(self) -> tuple[bool, str]:
        missing = first_missing(("litert_torch", "pip install litert-torch"), ("torch", "pip install torch"),
                                ("ai_edge_litert", "pip install ai-edge-litert"))
        return (False, missing) if missing else (True, "litert-torch present")

    def build(self, src: PeerInput, out_dir: Path) -> Path:
        import litert_torch
        import torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        from targets.calibration_data import torch_batches

        if src.source.torch_model is None:
            raise BenchError("the TFLite peer converts the PyTorch model, and this input has none")
        litert_torch.config.show_progress = False
        model = src.source.torch_model().eval()
        sample = (torch.from_numpy(np.ascontiguousarray(src.calibration.inputs[:1])),)
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
        with torch.no_grad():
            for batch in torch_batches(src.calibration, batch_size=1):
                prepared(batch)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        for m in converted.modules():  # an exported module refuses eval(); its flag says training otherwise
            m.training = False
        dst = out_dir / self.suffix
        litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(dst))
        return dst

    def load(self, path: Path, *, threads: int | None) -> Runner:
        from targets.tflite_target import TfliteRunner

        return TfliteRunner(path, threads=threads)


PEERS: tuple[Peer, ...] = (OrtQuantizeStatic(), NncfQuantize(), LiteRtFullInteger())


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]


def _top1(run: Any, x: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(run(x))
    except Exception:  # a fixed-batch artifact: one sample at a time
        out = np.concatenate([np.asarray(run(x[i : i + 1])) for i in range(len(x))])
    return np.asarray(out.reshape(len(x), -1).argmax(axis=1))


def _ratio_dict(r: Ratio) -> dict[str, Any]:
    return {**r.to_dict(), "text": str(r)}


def _verdict(speed: Ratio, ours_acc: float | None, peer_acc: float | None) -> str:
    """Does ours meet the goal against this peer: at least as fast, at least as accurate?"""
    notes = []
    if speed.hi < 1.0:
        notes.append("slower")
    elif speed.median < 1.0:
        notes.append("not faster (the spread crosses 1)")
    if ours_acc is not None and peer_acc is not None and ours_acc < peer_acc:
        notes.append("less accurate")
    return ", ".join(notes) or "meets"


def compare_peers(
    src: PeerInput, *, out_dir: Path, settings: Settings, repetitions: int = 5, threads: int | None = DEFAULT_THREADS,
    targets: list[str] | None = None, peers: tuple[Peer, ...] = PEERS, progress: Progress | None = None,
) -> dict[str, Any]:
    """Build each runtime's peer int8 (and ours where absent), measure all interleaved, one row per runtime."""
    from edgecore.bundle import open_bundle
    from targets._ort import OrtRunner

    spec = src.source.input_spec
    name = src.source.name
    rows: list[dict[str, Any]] = []
    contenders: list[Contender] = []
    pairs: list[tuple[dict[str, Any], str, str]] = []  # (row, our contender, peer contender)
    for peer in peers:
        if targets and peer.target not in targets:
            continue
        row: dict[str, Any] = {"target": peer.target, "peer": {"tool": peer.tool, "recipe": peer.recipe}}
        rows.append(row)
        ok, why = peer.available()
        if not ok:
            row["skipped"] = f"{peer.tool} is not available here: {why}"
            continue
        try:
            ours_dir = src.ours.get(peer.target)
            if ours_dir is None or not (ours_dir / "manifest.json").is_file():
                if progress:
                    progress(f"building our {peer.target} int8")
                ours_dir = src.build_ours(peer.target)
            ours = bundle_contender(open_bundle(ours_dir), threads=threads)
        except (EdgeError, OSError, RuntimeError, ValueError) as e:
            row["skipped"] = f"our {peer.target} int8 could not be built or loaded: {_one_line(e)}"
            continue
        pdir = Path(out_dir) / "peers" / peer.target
        pdir.mkdir(parents=True, exist_ok=True)
        try:
            if progress:
                progress(f"building the {peer.target} peer with {peer.tool}")
            main = peer.build(src, pdir)
            runner = peer.load(main, threads=threads)
        except Exception as e:  # a vendor tool's failure is the finding: named, never replaced
            row["skipped"] = f"{peer.tool} could not build or load an int8 artifact of {name}: {_one_line(e)}"
            continue
        size = sum(f.stat().st_size for f in pdir.iterdir() if f.is_file())
        ours.meta["role"] = "ours"
        peer_c = Contender(name=f"{name} {peer.target}/int8 peer", model=name, run=runner.run, input_spec=spec,
                           meta={"kind": "peer", "role": "peer", "target": peer.target, "precision": "int8",
                                 "tool": peer.tool, "artifact_path": str(main), "size_bytes": size,
                                 "threads": threads})
        contenders += [ours, peer_c]
        pairs.append((row, ours.name, peer_c.name))
    env = environment(threads=threads)
    steal = StealMeter()
    measured: dict[str, dict[str, Any]] = {}
    if contenders:
        for r in measure(contenders, settings=settings, repetitions=repetitions, data=src.data,
                         do_accuracy=src.data is not None, progress=progress):
            measured[r["artifact"]] = r
        x = inputs_for(spec, src.data) if src.data is not None else random_inputs(spec, 64, seed=1)
        ref = _top1(OrtRunner(Path(src.source.onnx_fp32), threads=threads).run, x)
        for c in contenders:
            measured[c.name]["agreement_fp32"] = float((_top1(c.run, x) == ref).mean())
    env.update(load_avg_after=load_average(), steal_pct=steal.share())
    for row, ours_name, peer_name in pairs:
        o, p = measured[ours_name], measured[peer_name]
        speed = paired(o["round_scores"], p["round_scores"])
        oa = (o.get("accuracy") or {}).get("accuracy")
        pa = (p.get("accuracy") or {}).get("accuracy")
        row.update(
            ours=_side(o, method=(o.get("build_metrics") or {}).get("method")),
            peer={**row["peer"], **_side(p)},
            speedup_ours_over_peer=_ratio_dict(speed),
            accuracy_delta_pt=None if oa is None or pa is None else round(100 * (oa - pa), 2),
            agreement_delta_pt=round(100 * (o["agreement_fp32"] - p["agreement_fp32"]), 2),
            verdict=_verdict(speed, oa if oa is not None else o["agreement_fp32"],
                             pa if pa is not None else p["agreement_fp32"]),
        )
    return {"kind": "hw_bench.peers", "model": name, "input": src.origin, "env": env, "threads": threads,
            "settings": settings.to_dict() | {"repetitions": repetitions},
            "data": None if src.data is None else {"source": src.data.source, "n": len(src.data)},
            "calibration": src.calibration.provenance(), "rows": rows}


def _side(r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    acc = r.get("accuracy") or {}
    return {"artifact": r["artifact"], "p50_ms": r["latency_ms"]["p50"], "p90_ms": r["latency_ms"]["p90"],
            "throughput_sps": r["throughput_sps"], "round_scores": r["round_scores"],
            "accuracy": acc.get("accuracy"), "agreement_fp32": r["agreement_fp32"], "size_bytes": r.get("size_bytes"),
            **{k: v for k, v in {"bundle": r.get("bundle"), "artifact_path": r.get("artifact_path"), **extra}.items()
               if v is not None}}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def markdown(result: dict[str, Any]) -> str:
    """The peers table: one row per runtime, ours beside its own quantizer's."""
    env = result["env"]
    cpu = env["cpu"]
    s = result["settings"]
    lines = [
        f"## INT8 peers: {result['model']}",
        "",
        f"CPU: {cpu['model']} ({cpu.get('usable_cores')} usable cores), threads {result['threads']}; "
        f"load average before {env.get('load_avg')}, after {env.get('load_avg_after')}; "
        f"steal {env.get('steal_pct')}%",
        f"{s['scenario']}, {s['repetitions']} interleaved rounds; accuracy on "
        f"{(result['data'] or {}).get('source', 'no labelled data (agreement with fp32 only)')}; "
        f"calibration {result['calibration']['samples']} samples",
        "",
        "| runtime | peer | ours p50 ms | peer p50 ms | ours over peer | ours acc | peer acc | "
        "ours agree fp32 | peer agree fp32 | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['target']} | {r['peer']['tool']} | — | — | — | — | — | — | — | "
                         f"skipped: {r['skipped']} |")
            continue
        o, p = r["ours"], r["peer"]
        lines.append(
            f"| {r['target']} | {p['tool']} | {o['p50_ms']:.3f} | {p['p50_ms']:.3f} | "
            f"{r['speedup_ours_over_peer']['text']} | {_pct(o['accuracy'])} | {_pct(p['accuracy'])} | "
            f"{_pct(o['agreement_fp32'])} | {_pct(p['agreement_fp32'])} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


# --- inputs: a run directory, a `hw-bench models` model directory, or a family name to build one ---------------

def _onnx_shapes(path: Path) -> tuple[tuple[int, ...], int]:
    """(sample shape of the first input, classes of the first output)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dims = g.input[0].type.tensor_type.shape.dim
    out = g.output[0].type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in list(dims)[1:]), int(out[-1].dim_value)


def model_dir_input(mdir: Path, *, data: TestData | None, progress: Progress | None = None) -> PeerInput:
    """A directory ``hw-bench models`` wrote: ``model.pt``, ``model.onnx``, ``bundles/<target>-int8``."""
    from edgecore.bundle import open_bundle

    from .baseline import _load_module
    from .models import bench_input_spec, build_for_targets, random_calibration

    mdir = Path(mdir)
    module, name = _load_module(str(mdir / "model.pt"))
    name = name or mdir.name
    bundles = mdir / "bundles"
    ours = {t: bundles / f"{t}-int8" for t in (p.target for p in PEERS)}
    existing = [d for d in ours.values() if (d / "manifest.json").is_file()]
    if existing:
        spec, labels = open_bundle(existing[0]).input_spec, tuple(open_bundle(existing[0]).manifest.output.labels)
    else:
        shape, classes = _onnx_shapes(mdir / "model.onnx")
        spec, labels = bench_input_spec(shape), tuple(str(i) for i in range(classes))
    calib = random_calibration(spec)
    source = ModelSource(name=name, input_spec=spec, labels=labels, onnx_fp32=mdir / "model.onnx",
                         torch_model=lambda: module)

    def build_ours(target: str) -> Path:
        built, skipped = build_for_targets(source=source, calibration=calib, out_dir=bundles, targets=[target],
                                           precisions=["int8"], check_inputs=calib.inputs[:4], progress=progress)
        if not built:
            raise BenchError("; ".join(skipped) or f"no {target} int8 build")
        return built[0]

    return PeerInput(source=source, calibration=calib, ours=ours, build_ours=build_ours, data=data, origin=str(mdir))


def run_dir_input(run_dir: Path, *, data: TestData | None) -> PeerInput:
    """A training run: its student's fp32 ONNX, its stored representative set, its int8 bundles, its test split."""
    from toolchain.bundle import build_bundle, default_out, reference_for, representative_for
    from toolchain.rundir import RunDir

    from .data import from_run_dir

    run = RunDir(run_dir)
    source = run.model_source()
    calib = representative_for(run.path, reference_for(run.path))
    ours = {p.target: default_out(run.path, p.target, "int8") for p in PEERS}

    def build_ours(target: str) -> Path:
        return Path(build_bundle(run_dir=run.path, target=target, precision="int8")["bundle"])

    return PeerInput(source=source, calibration=calib, ours=ours, build_ours=build_ours,
                     data=data if data is not None else from_run_dir(run.path), origin=str(run.path))


def resolve_input(model_or_run: str, *, work: Path, data: TestData | None, size: int = 224,
                  progress: Progress | None = None) -> PeerInput:
    """A model directory (``model.pt`` + ``model.onnx``), a run directory, or a benchmark family to build."""
    from .models import FAMILIES, build_bench_models

    p = Path(model_or_run)
    if p.is_dir() and (p / "model.onnx").is_file() and (p / "model.pt").is_file():
        return model_dir_input(p, data=data, progress=progress)
    if p.is_dir():
        return run_dir_input(p, data=data)
    if model_or_run in FAMILIES:
        out = Path(work) / "models"
        build_bench_models(out_dir=out, families=[model_or_run], targets=[q.target for q in PEERS],
                           precisions=["int8"], size=size, progress=progress)
        return model_dir_input(out / f"{model_or_run}{size}", data=data, progress=progress)
    raise BenchError(f"{model_or_run!r}: not a run directory, a model directory written by `hw-bench models` "
                     f"(model.pt + model.onnx) or a benchmark family ({', '.join(FAMILIES)})")
