"""Benchmark models built with the toolchain itself (cloud side; torch inside).

MobileNet-style, ResNet-style and ViT-Ti/16-style networks from `toolchain.models` at
``size``x``size``x3 (224 by default) and a detector (`toolchain.detection.model`:
MobileNet backbone, FPN, shared decoupled head, 80 classes; 320 by default) with
random weights (speed does not depend on the weights; BatchNorm statistics are
re-estimated so activations keep a trained network's scale, and the detector's
class bias is set so that, on the random inputs ``hw-bench run`` feeds, its
decode sees a trained detector's candidate count),
exported by `toolchain.export.export_onnx`, then built by every available target
for every precision it has, with `Target.build`, into bundles. The detector's
bundles name the ``detect`` task and its decode parameters, so ``hw-bench run``
times its decode + NMS per frame. (A trained run's student is built by
``toolchain build``, which also verifies it and chooses its routing threshold.)

Layout: ``OUT/<model>/model.pt`` (the PyTorch baseline: ``hw-bench run
--baseline OUT/<model>/model.pt``), ``OUT/<model>/model.onnx``,
``OUT/<model>/bundles/<target>-<precision>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgecore.errors import BenchError
from edgecore.spec import InputSpec
from edgecore.tasks import TaskSpec
from targets import load_runner

if TYPE_CHECKING:  # pragma: no cover
    from edgecore.representative import RepresentativeSet

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: family -> ModelConfig keyword arguments (ImageNet-like widths)
FAMILIES: dict[str, dict[str, Any]] = {
    "mobilenet": {"family": "mobilenet", "width": 32, "width_mult": 1.0, "depth_mult": 1.0, "dropout": 0.0},
    "resnet": {"family": "resnet", "width": 64, "depth": 2, "dropout": 0.0},
    # ViT-Ti/16 (DeiT-tiny's shape): 192 wide, 12 blocks of 3 heads, MLP 4x, 16x16 patches, class token
    "vit": {"family": "vit", "width": 192, "depth": 12, "heads": 3, "patch": 16, "mlp_ratio": 4.0, "pool": "cls",
            "stem": "patch", "dropout": 0.0},
}
NUM_CLASSES = 1000
CALIBRATION_SAMPLES = 32
CLASSIFIER_SIZE = 224

#: detector name -> `build_detector` arguments: the MobileNet family's backbone (as ``mobilenet`` above), an FPN
#: and a decoupled head of two 3x3 convs per branch over COCO's 80 classes
DETECTORS: dict[str, dict[str, Any]] = {
    "detector": {"cfg": dict(FAMILIES["mobilenet"]), "num_classes": 80, "head_convs": 2, "neck_width": 64},
}
DETECTOR_SIZE = 320
#: (location, class) pairs above the decode's score threshold per image that the random detector is set to
#: produce: what a trained detector gives on a scene with a few objects (a trained 3-class shapes detector at
#: 320x320: ~180; random logits would give thousands, a freshly initialised head none)
DETECTOR_CANDIDATES = 200


def recalibrate_batchnorm(model: Any, *, shape: tuple[int, ...], batches: int = 4, batch_size: int = 8,
                          inputs: np.ndarray | None = None) -> Any:
    """Re-estimate BatchNorm statistics on random inputs (or on ``inputs``, preprocessed images), then eval mode.

    With freshly initialised weights activations shrink layer after layer (the
    logits of a 224 MobileNet end up ~1e-3 and all but tied); with statistics
    measured on its own activations every layer is normalised as in a trained
    network, so int8 calibration ranges and logit gaps are realistic.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if inputs is not None:
            for i in range(0, len(inputs), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(inputs[i : i + batch_size])))
        else:
            for _ in range(batches):
                model(torch.randn(batch_size, *shape, generator=g))
    return model.eval()


def _write_bundle(bundle_dir: Path, *, artifact: Any, source: Any, calibration: Any, metrics: dict[str, Any],
                  signing_key: Any = None, task: TaskSpec | None = None) -> None:
    """Manifest + hashes for a built artifact: the toolchain's one manifest assembler, the one bundle writer."""
    from edgecore.bundle import write_bundle
    from toolchain.bundle import manifest_for

    write_bundle(bundle_dir, manifest_for(artifact, name=source.name, version="bench", input_spec=source.input_spec,
                                          labels=source.labels, metrics=metrics, calibration=calibration, task=task),
                 signing_key=signing_key)


def _agreement(bundle_dir: Path, ref_logits: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of the built artifact with PyTorch on ``x`` (checks the build ran right; class vectors
    only) and the largest difference of any raw output."""
    from edgecore.bundle import open_bundle

    runner = load_runner(open_bundle(bundle_dir))
    try:
        out = np.asarray(runner.run(x))
    except Exception:
        out = np.concatenate([np.asarray(runner.run(x[i : i + 1])) for i in range(len(x))])
    agree = {"agreement": float((out.argmax(1) == ref_logits.argmax(1)).mean())} if out.ndim == 2 else {}
    return {**agree, "max_abs_logit_diff": float(np.abs(out - ref_logits).max())}


def build_for_targets(
    *, source: Any, calibration: Any, out_dir: Path, targets: list[str] | None, precisions: list[str] | None,
    check_inputs: np.ndarray, progress: Callable[[str], None] | None = None, task: TaskSpec | None = None,
    metrics: dict[str, Any] | None = None,
) -> tuple[list[Path], list[str]]:
    """Build ``source`` for every (available) target x precision; returns (bundles, skipped reasons). ``task``: the
    manifests' task block (classification by default); ``metrics``: added to every manifest's metrics."""
    import torch

    from edgecore.fsutil import atomic_dir
    from edgecore.spec import Precision
    from targets import get_target, target_names
    from toolchain.bundle import build_each
    from toolchain.models import count_params

    model = source.torch_model()
    with torch.inference_mode():
        ref = model(torch.from_numpy(check_inputs)).numpy()
    todo: list[tuple[str, str]] = []
    skipped: list[str] = []
    for name in targets or target_names():
        target = get_target(name)
        ok, why = target.build_available()
        ok2, why2 = target.available()
        if not (ok and ok2):
            skipped.append(f"{name}: {why if not ok else why2}")
            continue
        todo += [(name, p.value) for p in target.precisions if not precisions or p.value in precisions]

    def build_one(name: str, precision: str) -> Path:
        target = get_target(name)
        dest = out_dir / f"{name}-{precision}"
        with atomic_dir(dest) as tmp:
            artifact = target.build(source, Precision(precision), calibration, tmp)
            _write_bundle(tmp, artifact=artifact, source=source, calibration=calibration, metrics={}, task=task)
            found = {**_agreement(tmp, ref, check_inputs), "params": count_params(model), **(metrics or {})}
            _write_bundle(tmp, artifact=artifact, source=source, calibration=calibration, metrics=found, task=task)
        return dest

    done, failed = build_each(todo, build_one, on_step=lambda t, p: progress and progress(
        f"building {source.name} for {t}/{p}"))
    skipped += [f"{f['target']}/{f['precision']}: {f['error']}" for f in failed]
    return list(done.values()), skipped


def bench_input_spec(sample_shape: tuple[int, ...]) -> InputSpec:
    """The input of a benchmark model: raw 0-255 pixels, ImageNet normalisation for three channels."""
    if len(sample_shape) == 3 and sample_shape[0] == 3:
        return InputSpec("input", (None, *sample_shape), layout="NCHW", scale=1 / 255, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD)
    return InputSpec("input", (None, *sample_shape), layout="NCHW" if len(sample_shape) == 3 else "NF", scale=1 / 255)


def random_calibration(spec: InputSpec, n: int = CALIBRATION_SAMPLES) -> RepresentativeSet:
    """``n`` seeded random images, preprocessed: the representative set of every benchmark model's int8 builds."""
    from edgecore.representative import RepresentativeSet
    from edgecore.representative import content_digest as _digest

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(n, *spec.sample_shape)).astype(np.float32)
    x = spec.preprocess(raw)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return RepresentativeSet(inputs=x, labels=labels, indices=np.arange(len(x)), sha256=_digest(x, labels),
                             method="random-images (speed benchmark)")


def noise_calibration(spec: InputSpec, n: int = CALIBRATION_SAMPLES) -> RepresentativeSet:
    """The first ``n`` of the inputs ``hw-bench run`` feeds without data (`hw_bench.bench.random_inputs`): the
    detector's BatchNorm statistics, class bias and int8 ranges come from what it is timed on, so its decode sees
    there the candidate count it was set for."""
    from edgecore.representative import RepresentativeSet
    from edgecore.representative import content_digest as _digest

    from .bench import random_inputs

    x = random_inputs(spec, n)
    labels = np.full(n, -1, np.int64)
    return RepresentativeSet(inputs=x, labels=labels, indices=np.arange(n), sha256=_digest(x, labels),
                             method="random-normal (speed benchmark)")


def random_detector(name: str, size: int, inputs: np.ndarray, *, candidates: int = DETECTOR_CANDIDATES) -> tuple[Any, Any]:
    """(the detector ``name`` of `DETECTORS` at ``size``, random weights and BatchNorm folded, its `DecodeParams`).

    BatchNorm statistics are measured on ``inputs``; the predictions are redrawn so that boxes span a few strides
    and class logits vary (a fresh head predicts 1% everywhere: nothing to decode), then the class bias is set so
    that about ``candidates`` (location, class) pairs per image of ``inputs`` score above the decode's threshold.
    """
    import math

    import torch

    from toolchain.config import ModelConfig
    from toolchain.detection.model import build_detector, detection_params
    from toolchain.passes.qat import fold_batchnorm

    d = DETECTORS[name]
    torch.manual_seed(0)
    model = build_detector(ModelConfig(**d["cfg"]), input_shape=(3, size, size), num_classes=d["num_classes"],
                           head_convs=d["head_convs"], neck_width=d["neck_width"])
    model = recalibrate_batchnorm(model, shape=(3, size, size), inputs=inputs)
    fold_batchnorm(model)
    params = detection_params(model, size)
    head = model.head
    g = torch.Generator().manual_seed(1)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    with torch.no_grad():
        for conv, std, bias in ((head.cls_pred, 1.0, 0.0), (head.box_pred, 0.5, 2.0)):
            fan_in = conv.weight.shape[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std / math.sqrt(fan_in))
            conv.bias.fill_(bias)
        z = model(x)[..., 4:].numpy()
        cut = float(np.quantile(z, 1.0 - candidates / (params.num_anchors * params.num_classes)))
        t = params.score_threshold
        head.cls_pred.bias.fill_(math.log(t / (1 - t)) - cut)
    return model.eval(), params


def decode_counts(model: Any, params: Any, inputs: np.ndarray) -> dict[str, float]:
    """Per image of ``inputs``, on average: the (location, class) pairs above the score threshold and the boxes
    `edgecore.detect.decode` keeps: what the decode+NMS column of ``hw-bench run`` times on such inputs."""
    import torch

    from edgecore.detect import decode

    with torch.no_grad():
        raw = model(torch.from_numpy(np.ascontiguousarray(inputs))).numpy()
    t = params.score_threshold
    cand = (raw[..., 4:] > np.log(t / (1 - t))).sum(axis=(1, 2))
    return {"decode_candidates_per_image": round(float(cand.mean()), 1),
            "decode_kept_per_image": round(float(np.mean([len(d) for d in decode(raw, params)])), 1)}


def bench_model_names() -> list[str]:
    """What ``hw-bench models --families`` accepts: the classifier families and the detectors."""
    return [*FAMILIES, *DETECTORS]


def build_bench_models(
    *, out_dir: Path, families: list[str], targets: list[str] | None = None, precisions: list[str] | None = None,
    size: int | None = None, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Random-weight models of ``families`` (classifiers at ``size`` or 224, detectors at ``size`` or 320, square
    RGB inputs), built for every available target into ``out_dir/<family><size>/``."""
    import torch

    from toolchain.config import ModelConfig
    from toolchain.models import build_model

    from .bench import random_inputs

    unknown = [f for f in families if f not in FAMILIES and f not in DETECTORS]
    if unknown:
        raise BenchError(f"unknown benchmark families {unknown}; choose from {', '.join(bench_model_names())}")
    out_dir = Path(out_dir)
    all_built: list[Path] = []
    skipped: list[str] = []
    for fam in families:
        task: TaskSpec | None = None
        metrics: dict[str, Any] = {}
        if fam in DETECTORS:
            side = size or DETECTOR_SIZE
            spec = bench_input_spec((3, side, side))
            calib = noise_calibration(spec)
            model, params = random_detector(fam, side, calib.inputs)
            task = TaskSpec("detect", params.to_dict())
            labels = tuple(str(i) for i in range(params.num_classes))
            metrics = decode_counts(model, params, random_inputs(spec)[:16])  # what `hw-bench run` decodes
        else:
            side = size or CLASSIFIER_SIZE
            spec = bench_input_spec((3, side, side))
            calib = random_calibration(spec)
            torch.manual_seed(0)
            model = build_model(ModelConfig(**FAMILIES[fam]), input_shape=(3, side, side), num_classes=NUM_CLASSES)
            model = recalibrate_batchnorm(model, shape=(3, side, side))
            labels = tuple(str(i) for i in range(NUM_CLASSES))
        built, sk = _build_model_dir(f"{fam}{side}", model, spec, labels, calib, out_dir=out_dir, targets=targets,
                                     precisions=precisions, progress=progress, task=task, metrics=metrics)
        all_built += built
        skipped += sk
    return {"bundles": all_built, "skipped": skipped}


def _build_model_dir(
    name: str, model: Any, spec: InputSpec, labels: tuple[str, ...], calib: RepresentativeSet, *, out_dir: Path,
    targets: list[str] | None, precisions: list[str] | None, progress: Callable[[str], None] | None,
    task: TaskSpec | None, metrics: dict[str, Any],
) -> tuple[list[Path], list[str]]:
    """``out_dir/name/``: ``model.pt``, ``model.onnx`` and ``bundles/<target>-<precision>/``; (bundles, skipped)."""
    import torch

    from targets.base import ModelSource
    from toolchain.export import export_onnx

    mdir = out_dir / name
    mdir.mkdir(parents=True, exist_ok=True)
    torch.save({"module": model, "name": name}, mdir / "model.pt")
    if progress:
        progress(f"exporting {name} to ONNX")
    export_onnx(model, mdir / "model.onnx", input_shape=spec.sample_shape, opset=18)
    source = ModelSource(name=name, input_spec=spec, labels=labels, onnx_fp32=mdir / "model.onnx",
                         torch_model=lambda m=model: m)
    built, sk = build_for_targets(source=source, calibration=calib, out_dir=mdir / "bundles", targets=targets,
                                  precisions=precisions, check_inputs=calib.inputs[:4], progress=progress, task=task,
                                  metrics=metrics)
    return built, [f"{name} {s}" for s in sk]
