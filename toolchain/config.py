"""Strict, typed configuration: ``toolchain.toml`` plus ``--set`` overrides.

Why strict: a typo in a config key silently falling back to a default costs a
training run. Every section is a frozen dataclass; an unknown key, a wrong type
or a missing path is one `ConfigError` naming the field and the file. Types are
checked here, from the annotations; each section checks its own ranges in its
``validate`` (`toolchain.section`). The compression passes' sections
(``[prune]``, ``[distill]``, ``[qat]``, ``[ptq]``) live beside their passes in
`toolchain.passes`; this module gathers them into `Config`.

Torch-free (the CLI parses configs before importing torch).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import tomllib

from edgecore.errors import ConfigError
from toolchain.passes.distill import DistillConfig
from toolchain.passes.prune import PruneConfig
from toolchain.passes.ptq import PtqConfig
from toolchain.passes.qat import MAX_BATCH, QatConfig
from toolchain.section import MAX_EPOCHS, Check, Section


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
class TaskConfig(Section):
    """What the model does (docs/tasks.md): ``classify`` (one class per input). ``task = "NAME"`` at the top of
    the file is short for ``[task] name = "NAME"``."""

    name: str = "classify"

    def validate(self, check: Check) -> None:
        from edgecore.tasks import task_names

        check.need(self.name in task_names(), "name", f"must be one of {', '.join(task_names())}")


@dataclass(frozen=True)
class RunConfig(Section):
    dir: Path = Path("runs/digits")  # run directory (relative paths: to the current directory)
    name: str = "digits-student"  # model name written into bundles
    seed: int = 0


#: most images a generated source (``shapes``) may make
MAX_GENERATED = 1_000_000


@dataclass(frozen=True)
class DataConfig(Section):
    # classification: "digits" | "mnist1d" | "imagefolder:PATH" | "python:module:function"
    # detection: "shapes" | "yolo:PATH" | "coco:PATH/annotations.json"
    source: str = "digits"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # carved from the training share: the routing temperature, threshold and drift reference are fitted on it,
    # inputs no stage selects a checkpoint on (0: fit them on the validation split, which is selection-biased)
    calibration_fraction: float = 0.1
    image_size: int = 32  # imagefolder, shapes, yolo, coco: images are image_size x image_size (detection: letterboxed)
    channels: int = 3  # imagefolder, yolo, coco: 1 (grayscale) or 3 (RGB)
    count: int = 1000  # shapes: how many images are generated
    batch_size: int = 64

    def validate(self, check: Check) -> None:
        check.need(0.0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        check.need(0.0 < self.test_fraction < 0.5, "test_fraction", "must be in (0, 0.5)")
        check.need(0.0 <= self.calibration_fraction < 0.5, "calibration_fraction", "must be in [0, 0.5)")
        check.need(self.val_fraction + self.test_fraction + self.calibration_fraction < 0.8, "calibration_fraction",
                   "with val_fraction and test_fraction must leave at least 20% for training")
        check.need(self.image_size >= 4, "image_size", "must be >= 4")
        check.need(self.channels in (1, 3), "channels", "must be 1 or 3")
        check.count("batch_size", low=1, high=MAX_BATCH)
        check.count("count", low=3, high=MAX_GENERATED)
        from toolchain.tasks import source_names, source_task

        if source_task(self.source) is None:
            raise check.error("source", f"expected one of {', '.join(map(repr, source_names()))}, got {self.source!r}")
        kind, _, rest = self.source.partition(":")
        if kind in ("imagefolder", "yolo") and not Path(rest).is_dir():
            what = "image folder" if kind == "imagefolder" else "YOLO folder"
            raise check.error("source", f"{what} {rest!r} does not exist")
        if kind == "coco" and not Path(rest).is_file():
            raise check.error("source", f"COCO annotations file {rest!r} does not exist")


@dataclass(frozen=True)
class ModelConfig(Section):
    # "resnet" | "mobilenet" | "mlp" | "python:module:function"
    family: str = "resnet"
    width: int = 32  # resnet: channels of the first stage; mobilenet: base channels before width_mult
    depth: int = 2  # resnet: residual blocks per stage
    width_mult: float = 1.0  # mobilenet
    depth_mult: float = 1.0  # mobilenet
    hidden: tuple[int, ...] = (128, 64)  # mlp hidden layer sizes
    dropout: float = 0.1
    head_convs: int = 2  # detectors: 3x3 convs in each head branch
    neck_width: int = 0  # detectors: FPN channels (0: the stride-8 backbone stage's, at least 16)
    heads: int = 4  # vit: attention heads (width // heads wide each)
    patch: int = 0  # vit: patch side in pixels (signals: samples); 0 picks one from the input size
    mlp_ratio: float = 2.0  # vit: MLP hidden width over width
    pool: str = "cls"  # vit: "cls" (a class token) | "mean" (of the tokens)
    stem: str = "conv"  # vit: "conv" (3x3 conv + overlapping patches: small data) | "patch" (plain patchify, ViT-B/16 style)

    #: families this section may name besides ``python:module:function``
    FAMILIES: ClassVar[tuple[str, ...]] = ("resnet", "mobilenet", "mlp", "vit")

    def validate(self, check: Check) -> None:
        """[teacher] and [student]: a known family and sane shapes."""
        if self.family not in self.FAMILIES and not self.family.startswith("python:"):
            raise check.error("family", f"unknown model family {self.family!r} "
                              f"(known: {', '.join(self.FAMILIES)}, or python:module:function)")
        check.need(self.width >= 1, "width", "must be >= 1")
        check.need(self.depth >= 1, "depth", "must be >= 1")
        check.need(self.width_mult > 0, "width_mult", "must be > 0")
        check.need(self.depth_mult > 0, "depth_mult", "must be > 0")
        check.need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check.need(0 <= self.head_convs <= 8, "head_convs", "must be in [0, 8]")
        check.need(self.neck_width >= 0, "neck_width", "must be >= 0 (0: the backbone's stride-8 width)")
        check.need(1 <= self.heads <= 256, "heads", "must be in [1, 256]")
        check.need(0 <= self.patch <= 1024, "patch", "must be in [0, 1024] (0: chosen from the input size)")
        check.need(0.0 < self.mlp_ratio <= 16.0, "mlp_ratio", "must be in (0, 16]")
        check.need(self.pool in ("mean", "cls"), "pool", "must be 'mean' or 'cls'")
        check.need(self.stem in ("conv", "patch"), "stem", "must be 'conv' or 'patch'")
        if self.family == "vit":
            check.need(self.width % self.heads == 0, "width",
                       f"must be a multiple of heads ({self.heads}) for family 'vit'")


@dataclass(frozen=True)
class TrainConfig(Section):
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
    # which training recipe fills the keys this config leaves at their defaults (toolchain.recipes):
    # "auto" (from the model: "transformer" when it has attention layers, else "convnet") | "convnet" | "transformer"
    recipe: str = "auto"

    def validate(self, check: Check) -> None:
        check.count("epochs", low=1, high=MAX_EPOCHS)
        check.count("warmup_epochs", low=0, high=MAX_EPOCHS)
        check.need(0.0 <= self.rotate_deg <= 180.0, "rotate_deg", "must be in [0, 180]")
        check.need(self.noise_std >= 0.0, "noise_std", "must be >= 0")
        check.need(0.0 <= self.broad_fraction <= 1.0, "broad_fraction", "must be in [0, 1]")
        check.need(self.lr > 0, "lr", "must be > 0")
        check.need(self.patience >= 1, "patience", "must be >= 1")
        check.need(self.recipe in ("auto", "convnet", "transformer"), "recipe",
                   "must be 'auto', 'convnet' or 'transformer'")


@dataclass(frozen=True)
class CompressConfig(Section):
    """The compression pipeline: which passes run, in order (see `toolchain.passes`)."""

    passes: tuple[str, ...] = ("prune", "distill", "qat")
    control: Control = Control.SCRATCH  # "scratch": also train the student's architecture from scratch, compare
    control_seeds: int = 1  # scratch controls, one seed each: the gain is over their median, with its spread

    def validate(self, check: Check) -> None:
        check.need(1 <= self.control_seeds <= 10, "control_seeds", "must be in [1, 10]")
        from toolchain.passes import pass_list_problem

        problem = pass_list_problem(self.passes)
        if problem:
            raise check.error("passes", f"{problem}, got {list(self.passes)!r}")


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student's architecture: ``teacher`` (default) starts from a copy of the teacher;
    any model family (with the same shape keys as [teacher]) builds a fresh student."""

    family: str = "teacher"
    compare: bool = True  # another family: also compress the pruned teacher and report it beside

    FAMILIES: ClassVar[tuple[str, ...]] = ("teacher",) + ModelConfig.FAMILIES


@dataclass(frozen=True)
class ExportConfig(Section):
    opset: int = 18
    atol: float = 1e-3  # fp32 ONNX vs PyTorch: max abs logit difference allowed
    min_agreement: float = 0.98  # QDQ ONNX vs the PyTorch QAT model: top-1 agreement required
    teacher: bool = True


#: An artifact may lose more than 0 and at most this many points of test accuracy: 100 would pass every artifact.
MAX_ACCURACY_BUDGET_PT = 10.0
ACCURACY_BUDGET_RANGE = (f"must be in (0, {MAX_ACCURACY_BUDGET_PT:g}]: the points of test accuracy an artifact "
                         "may lose against the PyTorch student")


def accuracy_budget_ok(points: float) -> bool:
    """The one bound on an accuracy budget (``build.accuracy_budget_pt``, ``toolchain verify --budget``)."""
    return 0.0 < points <= MAX_ACCURACY_BUDGET_PT


@dataclass(frozen=True)
class BuildConfig(Section):
    """Owned by the targets part (``toolchain build``)."""

    accuracy_budget_pt: float = 1.0
    calibration_samples: int = 300
    offload_budget: float = 0.10
    confidence: Confidence = Confidence.MAX_PROB
    verify: bool = True

    def validate(self, check: Check) -> None:
        check.need(accuracy_budget_ok(self.accuracy_budget_pt), "accuracy_budget_pt", ACCURACY_BUDGET_RANGE)
        check.need(0.0 <= self.offload_budget <= 1.0, "offload_budget", "must be in [0, 1]")
        check.need(self.calibration_samples >= 1, "calibration_samples", "must be >= 1")


@dataclass(frozen=True)
class RefreshConfig(Section):
    """``toolchain refresh``: re-distill the current student on its data plus the gateway's collected samples."""

    epochs: int = 15  # distillation epochs, continuing from the current student
    lr: float = 5e-4  # half the distillation's: a fine-tune that keeps what the student knew
    holdout_fraction: float = 0.25  # of the collected samples, kept out of training for the gates
    max_regression_pt: float = 0.5  # at most this much lost on the original test split
    min_samples: int = 20  # fewer collected samples than this: nothing to learn from, refused
    balance: Balance = Balance.OVERSAMPLE  # "oversample" | "weight" | "none": evening out the collected classes
    candidates: int = 3  # continuations trained with different seeds, then averaged (a uniform model soup)
    strategy: RefreshStrategy = RefreshStrategy.EXPERT  # "expert": keep the student, add a gated expert | "continue"
    min_box_score: float = 0.5  # detect: the teacher's boxes at least this sure are the collected frames' targets

    def validate(self, check: Check) -> None:
        check.count("epochs", low=1, high=MAX_EPOCHS)
        check.need(self.lr > 0, "lr", "must be > 0")
        check.need(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "must be in (0, 1)")
        check.need(self.max_regression_pt >= 0, "max_regression_pt", "must be >= 0")
        check.need(self.min_samples >= 2, "min_samples", "must be >= 2")
        check.need(1 <= self.candidates <= 16, "candidates", "must be 1..16")
        check.need(0.0 <= self.min_box_score <= 1.0, "min_box_score", "must be in [0, 1]")


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
    #: ``section.key`` names the config file or ``--set`` gave a value other than the default: a model's
    #: training recipe (`toolchain.recipes`) never overrides them. A key given its default value does not count:
    #: a file listing every default (the repository's toolchain.toml, a run's config.toml) makes no choice.
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


_SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name not in ("source_file", "explicit")]


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
    obj.validate(Check(obj, section, origin))
    return obj


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
    explicit = set(base.explicit)
    for name, obj in sections.items():  # a key given its default value states no choice (a file of every default)
        default = type(obj)()
        for key in (raw[name] if isinstance(raw[name], Mapping) else {"name": raw[name]}):
            (explicit.add if getattr(obj, key) != getattr(default, key) else explicit.discard)(f"{name}.{key}")
    cfg = dataclasses.replace(base, source_file=origin, explicit=frozenset(explicit), **sections)
    _check_task_source(cfg, origin)
    return cfg


def _check_task_source(cfg: Config, origin: str) -> None:
    """``data.source`` must be one the configured task reads (a detection set cannot train a classifier)."""
    from toolchain.tasks import source_task, train_task_class

    owner = source_task(cfg.data.source)
    if owner is not None and owner != cfg.task.name:
        mine = ", ".join(train_task_class(cfg.task.name).sources)
        raise ConfigError(f"{origin}: data.source {cfg.data.source!r} is a {owner} source but task.name is "
                          f"{cfg.task.name!r} (set task = {owner!r}, or use a {cfg.task.name} source: {mine})")


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
    "Balance", "BuildConfig", "CompressConfig", "Config", "Confidence", "Control", "DataConfig", "ExportConfig",
    "ModelConfig", "RefreshConfig", "RefreshStrategy", "RunConfig", "StudentConfig", "TrainConfig",
    "add_config_args", "config_from_args", "from_dict", "load_config", "parse_overrides", "to_dict", "to_toml",
]
