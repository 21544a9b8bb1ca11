"""Benchmark models built with the toolchain itself (cloud side; torch inside).

MobileNet-style, ResNet-style and ViT-Ti/16-style networks from `toolchain.models` at
``size``x``size``x3 with random weights (speed does not depend on the
weights; BatchNorm statistics are re-estimated so activations keep a
trained network's scale), exported by `toolchain.export.export_onnx`, then built by every
available target for every precision it has, with `Target.build`, into
bundles. (A trained run's student is built by ``toolchain build``, which
also verifies it and chooses its routing threshold.)

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


def recalibrate_batchnorm(model: Any, *, shape: tuple[int, ...], batches: int = 4, batch_size: int = 8) -> Any:
    """Re-estimate BatchNorm statistics on random inputs, then eval mode.

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
        for _ in range(batches):
            model(torch.randn(batch_size, *shape, generator=g))
    return model.eval()


def _write_bundle(bundle_dir: Path, *, artifact: Any, source: Any, calibration: Any, metrics: dict[str, Any],
                  signing_key: Any = None) -> None:
    """Manifest + hashes for a built artifact: the toolchain's one manifest assembler, the one bundle writer."""
    from edgecore.bundle import write_bundle
    from toolchain.bundle import manifest_for

    write_bundle(bundle_dir, manifest_for(artifact, name=source.name, version="bench", input_spec=source.input_spec,
                                          labels=source.labels, metrics=metrics, calibration=calibration),
                 signing_key=signing_key)


def _agreement(bundle_dir: Path, ref_logits: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of the built artifact with PyTorch on ``x`` (checks the build ran right)."""
    from edgecore.bundle import open_bundle

    runner = load_runner(open_bundle(bundle_dir))
    try:
        out = np.asarray(runner.run(x))
    except Exception:
        out = np.concatenate([np.asarray(runner.run(x[i : i + 1])) for i in range(len(x))])
    return {
        "agreement": float((out.argmax(1) == ref_logits.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(out - ref_logits).max()),
    }


def build_for_targets(
    *, source: Any, calibration: Any, out_dir: Path, targets: list[str] | None, precisions: list[str] | None,
    check_inputs: np.ndarray, progress: Callable[[str], None] | None = None,
) -> tuple[list[Path], list[str]]:
    """Build ``source`` for every (available) target x precision; returns (bundles, skipped reasons)."""
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
            _write_bundle(tmp, artifact=artifact, source=source, calibration=calibration, metrics={})
            metrics = {**_agreement(tmp, ref, check_inputs), "params": count_params(model)}
            _write_bundle(tmp, artifact=artifact, source=source, calibration=calibration, metrics=metrics)
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


def build_bench_models(
    *, out_dir: Path, families: list[str], targets: list[str] | None = None, precisions: list[str] | None = None,
    size: int = 224, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Random-weight ``size``x``size``x3 models of ``families``, built for every available target."""
    import torch

    from targets.base import ModelSource
    from toolchain.config import ModelConfig
    from toolchain.export import export_onnx
    from toolchain.models import build_model

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise BenchError(f"unknown benchmark families {unknown}; choose from {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    spec = bench_input_spec((3, size, size))
    calib = random_calibration(spec)
    x = calib.inputs
    all_built: list[Path] = []
    skipped: list[str] = []
    for fam in families:
        torch.manual_seed(0)
        model = build_model(ModelConfig(**FAMILIES[fam]), input_shape=(3, size, size), num_classes=NUM_CLASSES)
        model = recalibrate_batchnorm(model, shape=(3, size, size))
        name = f"{fam}{size}"
        mdir = out_dir / name
        mdir.mkdir(parents=True, exist_ok=True)
        torch.save({"module": model, "name": name}, mdir / "model.pt")
        if progress:
            progress(f"exporting {name} to ONNX")
        export_onnx(model, mdir / "model.onnx", input_shape=(3, size, size), opset=18)
        source = ModelSource(name=name, input_spec=spec, labels=tuple(str(i) for i in range(NUM_CLASSES)),
                             onnx_fp32=mdir / "model.onnx", torch_model=lambda m=model: m)
        built, sk = build_for_targets(source=source, calibration=calib, out_dir=mdir / "bundles", targets=targets,
                                      precisions=precisions, check_inputs=x[:4], progress=progress)
        all_built += built
        skipped += [f"{name} {s}" for s in sk]
    return {"bundles": all_built, "skipped": skipped}


