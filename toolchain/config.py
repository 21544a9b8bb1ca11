"""Strict, typed configuration: ``toolchain.toml`` plus ``--set`` overrides.

Why strict: a typo in a config key silently falling back to a default costs a
training run. Every section is a frozen dataclass; an unknown key, a wrong type
or a missing path is one `ConfigError` naming the field and the file.

Torch-free (the CLI parses configs before importing torch).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomllib

from edgecore.errors import ConfigError


class PruneTarget(str, enum.Enum):
    """What the pruning ratio is measured on."""

    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"  # measured on the target runtime (prune.latency_*)


class QdqWeightBits(str, enum.Enum):
    """Weight range of the QDQ graph: ``auto`` = 8 bits with VNNI, else 7 bits (±63)."""

    AUTO = "auto"
    SEVEN = "7"
    EIGHT = "8"


class Control(str, enum.Enum):
    """The baseline compress reports against: the student's architecture trained from scratch, or none."""

    SCRATCH = "scratch"
    NONE = "none"


class Balance(str, enum.Enum):
    """How ``toolchain refresh`` evens out the collected samples' classes.

    ``oversample``: rare classes drawn again up to the largest class's count (the collected part grows).
    ``weight``: per-class loss weights, each present class the same total, the collected part keeping its size
    (its share of training is what was collected). ``none``: as collected. Booleans (configs before ``weight``
    existed) read as ``true`` = ``oversample``, ``false`` = ``none``.
    """

    OVERSAMPLE = "oversample"
    WEIGHT = "weight"
    NONE = "none"

    @classmethod
    def from_bool(cls, value: bool) -> "Balance":
        return cls.OVERSAMPLE if value else cls.NONE


class RefreshStrategy(str, enum.Enum):
    """What ``toolchain refresh`` ships.

    ``expert``: the production student unchanged, plus an expert (the student continued on original + collected
    data) and a small gate trained to tell the original inputs from the collected ones; one graph answers with
    ``g * student + (1 - g) * expert``. What the student knew is kept; the model grows by one student and the gate.
    ``continue``: the continued student replaces it (same size; it forgets some of its original inputs).
    """

    EXPERT = "expert"
    CONTINUE = "continue"


class Confidence(str, enum.Enum):
    MAX_PROB = "max_prob"
    MARGIN = "margin"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class TaskConfig:
    """What the model does (docs/tasks.md): ``classify`` (one class per input). ``task = "NAME"`` at the top of
    the file is short for ``[task] name = "NAME"``."""

    name: str = "classify"


@dataclass(frozen=True)
class RunConfig:
    dir: Path = Path("runs/digits")  # run directory (relative paths: to the current directory)
    name: str = "digits-student"  # model name written into bundles
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # "digits" | "imagefolder:PATH" | "python:module:function"
    source: str = "digits"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    image_size: int = 32  # imagefolder only: images are resized to image_size x image_size
    channels: int = 3  # imagefolder only: 1 (grayscale) or 3 (RGB)
    batch_size: int = 64


@dataclass(frozen=True)
class ModelConfig:
    # "resnet" | "mobilenet" | "mlp" | "python:module:function"
    family: str = "resnet"
    width: int = 32  # resnet: channels of the first stage; mobilenet: base channels before width_mult
    depth: int = 2  # resnet: residual blocks per stage
    width_mult: float = 1.0  # mobilenet
    depth_mult: float = 1.0  # mobilenet
    hidden: tuple[int, ...] = (128, 64)  # mlp hidden layer sizes
    dropout: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    patience: int = 15  # early stopping: epochs without a better validation accuracy
    label_smoothing: float = 0.05
    augment: bool = True  # random shifts by one pixel (images only)
    # the teacher only (a cloud model trained on broader data than the device sees): random rotations up to
    # rotate_deg either way and gaussian noise of noise_std (in normalised units) on a share of the batches
    rotate_deg: float = 0.0
    noise_std: float = 0.0
    broad_fraction: float = 0.5  # share of each batch that gets the rotation/noise (the rest stays clean)
    amp: bool = True  # mixed precision, used only when CUDA is present
    num_workers: int = 0
    progress: bool = True


@dataclass(frozen=True)
class CompressConfig:
    """The compression pipeline: which passes run, in order (see `toolchain.passes`)."""

    passes: tuple[str, ...] = ("prune", "distill", "qat")
    control: Control = Control.SCRATCH  # "scratch": also train the student's architecture from scratch, compare


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student's architecture: ``teacher`` (default) starts from a copy of the teacher;
    any model family (with the same shape keys as [teacher]) builds a fresh student."""

    family: str = "teacher"
    compare: bool = True  # another family: also compress the pruned teacher and report it beside


@dataclass(frozen=True)
class PruneConfig:
    target: PruneTarget = PruneTarget.MACS
    ratio: float = 10.0  # reach at least this many times fewer MACs (or params) than the teacher
    steps: int = 4  # iterative steps, each followed by fine-tuning
    finetune_epochs: int = 2  # per step
    importance: str = "l2"  # "l1" | "l2" (magnitude of the channel group)
    max_channel_ratio: float = 0.95  # never remove more than this fraction of one layer's channels
    round_to: int = 1  # keep each pruned layer's channel count a multiple of this (torch-pruning's round_to)
    lr: float = 2e-3
    # target = "latency": NetAdapt-style search, each candidate built for latency_target and timed
    latency_budget_ms: float = 0.0  # the percentile below must be within this (required for "latency")
    latency_target: str = "onnx-fp32"  # TARGET-PRECISION the candidates are built for and timed on
    latency_device: str = "local"  # where they are timed ("local": this machine)
    latency_percentile: float = 50.0
    latency_threads: int = 2
    latency_step: float = 0.1  # share of each layer's channels removed per search step
    latency_max_candidates: int = 10  # search steps at most
    latency_extra_steps: int = 1  # steps past the first candidate within budget (a smaller one may be more accurate)
    latency_margin: float = 0.1  # a candidate must measure within budget * (1 - margin): headroom for the noise
    #                              between the search's measurement and the deployed artifact's
    # latency_device = a fleet device id: candidates go to it as signed bundles, timed by its agent's bench command
    latency_broker: str = ""  # mqtt(s)://host:port of the fleet
    latency_credentials: str = ""  # JSON {username, password} (or the fleet credentials.json: its operator entry)
    latency_gateway: str = ""  # upload candidates here (token in $EDGE_GATEWAY_TOKEN); else latency_share_dir
    latency_share_dir: str = ""  # without a gateway: a folder the device reads too (a shared mount)
    latency_sign_key: str = ""  # Ed25519 private key signing the candidate bundles (devices refuse unsigned ones)
    latency_deadline_s: float = 120.0  # per candidate, for the device's answer


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 20
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 - alpha goes to the hard labels
    lr: float = 3e-3
    patience: int = 8


@dataclass(frozen=True)
class QatConfig:
    epochs: int = 3
    lr: float = 2e-4
    weight_bits: QdqWeightBits = QdqWeightBits.AUTO
    freeze_observer_epoch: int = 2  # after this many QAT epochs the quantization ranges are frozen
    max_steps: int = 600  # cap on optimizer steps (epochs shrink on large data); 0 = no cap
    fold_batchnorm: bool = True  # fold BatchNorm into the conv/linear before it (much faster prepare/convert)


@dataclass(frozen=True)
class PtqConfig:
    """Post-training quantization (torchao pt2e): calibrate observers, no training."""

    calibration_samples: int = 512  # training samples the activation ranges are observed on
    weight_bits: QdqWeightBits = QdqWeightBits.AUTO
    fold_batchnorm: bool = True


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    atol: float = 1e-3  # fp32 ONNX vs PyTorch: max abs logit difference allowed
    min_agreement: float = 0.98  # QDQ ONNX vs the PyTorch QAT model: top-1 agreement required
    teacher: bool = True


@dataclass(frozen=True)
class BuildConfig:
    """Owned by the targets part (``toolchain build``)."""

    accuracy_budget_pt: float = 1.0
    calibration_samples: int = 300
    offload_budget: float = 0.10
    confidence: Confidence = Confidence.MAX_PROB
    verify: bool = True


@dataclass(frozen=True)
class RefreshConfig:
    """``toolchain refresh``: re-distill the current student on its data plus the gateway's collected samples."""

    epochs: int = 15  # distillation epochs, continuing from the current student
    lr: float = 5e-4  # half the distillation's: a fine-tune that keeps what the student knew
    holdout_fraction: float = 0.25  # of the collected samples, kept out of training for the gates
    max_regression_pt: float = 0.5  # at most this much lost on the original test split
    min_samples: int = 20  # fewer collected samples than this: nothing to learn from, refused
    balance: Balance = Balance.OVERSAMPLE  # "oversample" | "weight" | "none": evening out the collected classes
    candidates: int = 3  # continuations trained with different seeds, then averaged (a uniform model soup)
    strategy: RefreshStrategy = RefreshStrategy.EXPERT  # "expert": keep the student, add a gated expert | "continue"


@dataclass(frozen=True)
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    source_file: str = field(default="<defaults>", compare=False)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


_SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "source_file"]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in _SECTIONS}


def _coerce(value: Any, tp: Any, where: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only loss-free cases."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: {where}: expected {expected}, got {type(value).__name__} {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("a boolean")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise bad("a path string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, bool) and hasattr(tp, "from_bool"):  # an older config's boolean for this key
            return tp.from_bool(value)
        choices = [m.value for m in tp]
        key = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        if key in choices:
            return tp(key)
        raise ConfigError(f"{origin}: {where}: expected one of {choices}, got {value!r}")
    if typing.get_origin(tp) is tuple:
        (inner, _ell) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, inner, f"{where}[{i}]", origin) for i, v in enumerate(value))
        raise bad("a list")
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - programming error


def _build_section(cls: type, raw: Mapping[str, Any], section: str, origin: str, base: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: [{section}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{origin}: unknown key {section}.{key} (known in [{section}]: {', '.join(sorted(known))})"
            )
    values = {k: _coerce(v, hints[k], f"{section}.{k}", origin) for k, v in raw.items()}
    obj = dataclasses.replace(base, **values)
    _validate_section(obj, section, origin)
    return obj


def _validate_section(obj: Any, section: str, origin: str) -> None:
    """Range checks that types cannot express."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{origin}: {section}.{key}: {what}, got {getattr(obj, key)!r}")

    if isinstance(obj, TaskConfig):
        from edgecore.tasks import task_names

        need(obj.name in task_names(), "name", f"must be one of {', '.join(task_names())}")
    elif isinstance(obj, DataConfig):
        need(0.0 < obj.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        need(0.0 < obj.test_fraction < 0.5, "test_fraction", "must be in (0, 0.5)")
        need(obj.image_size >= 4, "image_size", "must be >= 4")
        need(obj.channels in (1, 3), "channels", "must be 1 or 3")
        need(obj.batch_size >= 1, "batch_size", "must be >= 1")
        if obj.source.startswith("imagefolder:"):
            path = Path(obj.source.split(":", 1)[1])
            if not path.is_dir():
                raise ConfigError(f"{origin}: data.source: image folder {str(path)!r} does not exist")
        elif obj.source not in ("digits", "mnist1d") and not obj.source.startswith("python:"):
            raise ConfigError(
                f"{origin}: data.source: expected 'digits', 'mnist1d', 'imagefolder:PATH' or "
                f"'python:module:function', got {obj.source!r}"
            )
    elif isinstance(obj, ModelConfig):
        _validate_model(obj, section, origin, need)
    elif isinstance(obj, TrainConfig):
        need(obj.epochs >= 1, "epochs", "must be >= 1")
        need(0.0 <= obj.rotate_deg <= 180.0, "rotate_deg", "must be in [0, 180]")
        need(obj.noise_std >= 0.0, "noise_std", "must be >= 0")
        need(0.0 <= obj.broad_fraction <= 1.0, "broad_fraction", "must be in [0, 1]")
        need(obj.lr > 0, "lr", "must be > 0")
        need(obj.patience >= 1, "patience", "must be >= 1")
    elif isinstance(obj, PruneConfig):
        need(obj.ratio >= 1.0, "ratio", "must be >= 1")
        need(obj.steps >= 1, "steps", "must be >= 1")
        need(obj.importance in ("l1", "l2"), "importance", "must be 'l1' or 'l2'")
        need(0.0 < obj.max_channel_ratio < 1.0, "max_channel_ratio", "must be in (0, 1)")
        need(1 <= obj.round_to <= 256, "round_to", "must be an integer in [1, 256]")
        if obj.target is PruneTarget.LATENCY:
            need(obj.latency_budget_ms > 0, "latency_budget_ms", "must be > 0 when prune.target = 'latency'")
            if obj.latency_device != "local":
                need(bool(obj.latency_broker), "latency_broker",
                     f"is required to measure on fleet device {obj.latency_device!r} (or use latency_device = 'local')")
                need(bool(obj.latency_gateway or obj.latency_share_dir), "latency_gateway",
                     "or latency_share_dir is required: how the fleet device gets each candidate bundle")
        need(0.0 < obj.latency_percentile <= 100.0, "latency_percentile", "must be in (0, 100]")
        need(obj.latency_threads >= 1, "latency_threads", "must be >= 1")
        need(0.0 < obj.latency_step < 1.0, "latency_step", "must be in (0, 1)")
        need(obj.latency_max_candidates >= 1, "latency_max_candidates", "must be >= 1")
        need(obj.latency_extra_steps >= 0, "latency_extra_steps", "must be >= 0")
        need(0.0 <= obj.latency_margin < 1.0, "latency_margin", "must be in [0, 1)")
    elif isinstance(obj, RefreshConfig):
        need(obj.epochs >= 1, "epochs", "must be >= 1")
        need(obj.lr > 0, "lr", "must be > 0")
        need(0.0 < obj.holdout_fraction < 1.0, "holdout_fraction", "must be in (0, 1)")
        need(obj.max_regression_pt >= 0, "max_regression_pt", "must be >= 0")
        need(obj.min_samples >= 2, "min_samples", "must be >= 2")
        need(1 <= obj.candidates <= 16, "candidates", "must be 1..16")
    elif isinstance(obj, DistillConfig):
        need(obj.temperature > 0, "temperature", "must be > 0")
        need(0.0 <= obj.alpha <= 1.0, "alpha", "must be in [0, 1]")
        need(obj.epochs >= 0, "epochs", "must be >= 0")
    elif isinstance(obj, QatConfig):
        need(obj.epochs >= 1, "epochs", "must be >= 1")
        need(obj.max_steps >= 0, "max_steps", "must be >= 0 (0: no cap)")
        need(obj.freeze_observer_epoch >= 1, "freeze_observer_epoch", "must be >= 1")
    elif isinstance(obj, PtqConfig):
        need(obj.calibration_samples >= 1, "calibration_samples", "must be >= 1")
    elif isinstance(obj, CompressConfig):
        from toolchain.passes import pass_list_problem

        problem = pass_list_problem(obj.passes)
        if problem:
            raise ConfigError(f"{origin}: {section}.passes: {problem}, got {list(obj.passes)!r}")
    elif isinstance(obj, BuildConfig):
        need(0.0 <= obj.offload_budget <= 1.0, "offload_budget", "must be in [0, 1]")
        need(obj.calibration_samples >= 1, "calibration_samples", "must be >= 1")



def _validate_model(obj: "ModelConfig", section: str, origin: str, need: Any) -> None:
    """[teacher] and [student]: a known family (a student may also be "teacher") and sane shapes."""
    families = ("teacher",) if isinstance(obj, StudentConfig) else ()
    families += ("resnet", "mobilenet", "mlp")
    if obj.family not in families and not obj.family.startswith("python:"):
        raise ConfigError(
            f"{origin}: {section}.family: unknown model family {obj.family!r} "
            f"(known: {', '.join(families)}, or python:module:function)"
        )
    need(obj.width >= 1, "width", "must be >= 1")
    need(obj.depth >= 1, "depth", "must be >= 1")
    need(obj.width_mult > 0, "width_mult", "must be > 0")
    need(obj.depth_mult > 0, "depth_mult", "must be > 0")
    need(0.0 <= obj.dropout < 1.0, "dropout", "must be in [0, 1)")


def from_dict(raw: Mapping[str, Any], *, origin: str = "<dict>", base: Config | None = None) -> Config:
    """Build a `Config` from nested tables, starting from ``base`` (defaults)."""
    base = base or Config()
    types_ = _section_types()
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name == "task" and isinstance(table, str):  # ``task = "detect"``: the section's one key
            table = {"name": table}
        if name not in types_:
            raise ConfigError(f"{origin}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        sections[name] = _build_section(types_[name], table, name, origin, getattr(base, name))
    return dataclasses.replace(base, source_file=origin, **sections)


def load_config(path: Path | str | None = None, *, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (TOML), apply ``section.key=value`` overrides, validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        cfg = from_dict(raw, origin=str(path))
    if overrides:
        cfg = dataclasses.replace(
            from_dict(parse_overrides(overrides), origin="--set", base=cfg), source_file=cfg.source_file
        )
    return cfg


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["train.epochs=3", "data.source=\"digits\""]`` -> nested dict (values parsed as TOML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare word: take it as a string
        out.setdefault(section, {})[name] = parsed
    return out


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (enums as values, paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        name: {f.name: plain(getattr(getattr(cfg, name), f.name)) for f in dataclasses.fields(getattr(cfg, name))}
        for name in _SECTIONS
    }


def to_toml(cfg: Config) -> str:
    """Serialise the resolved config (written as RUN/config.toml)."""
    lines: list[str] = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))  # pragma: no cover


def add_config_args(parser: Any) -> None:
    """``--config`` and ``--set`` for every pipeline command."""
    parser.add_argument("--config", "-c", type=Path, default=None, help="toolchain.toml (default: ./toolchain.toml if present)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set train.epochs=5",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (overrides run.dir)")


def config_from_args(args: Any) -> Config:
    path = args.config
    if path is None and Path("toolchain.toml").is_file():
        path = Path("toolchain.toml")
    cfg = load_config(path, overrides=list(args.overrides or ()))
    if getattr(args, "run_dir", None) is not None:
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, dir=Path(args.run_dir)))
    return cfg


__all__ = [
    "Balance", "BuildConfig", "CompressConfig", "Config", "Confidence", "Control", "DataConfig", "DistillConfig",
    "ExportConfig", "ModelConfig", "PruneConfig", "RefreshConfig", "RefreshStrategy", "PruneTarget", "PtqConfig",
    "QatConfig",
    "QdqWeightBits", "RunConfig", "StudentConfig", "TrainConfig",
    "add_config_args", "config_from_args", "from_dict", "load_config", "parse_overrides", "to_dict", "to_toml",
]
