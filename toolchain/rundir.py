"""The run directory: what ``train``, ``compress`` and ``export`` leave behind.

Layout (see docs/toolchain.md)::

    RUN/config.toml data.json teacher.pt checkpoints/ student.pt student_qat.pt
        teacher.onnx student.onnx student_qdq.onnx reports/{train,compress,export}.json

Other parts (targets, bundle, bench, demo) read a run only through `RunDir`.
Every file in it is written atomically, so a file that exists is complete.
Importing this module does not import torch; the loaders do.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecore.bundle import sha256_file  # one hashing helper for runs and bundles
from edgecore.errors import ModelError
from edgecore.fsutil import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from edgecore.spec import InputSpec
    from targets.base import ModelSource
    from toolchain.data import Splits
    from toolchain.tasks import TrainTask

CHECKPOINT_FORMAT = 1


class RunDir:
    """A run directory. ``RunDir(path)`` checks it has a config and data record."""

    CONFIG = "config.toml"
    DATA = "data.json"
    TEACHER = "teacher.pt"
    STUDENT = "student.pt"
    STUDENT_QAT = "student_qat.pt"
    TEACHER_ONNX = "teacher.onnx"
    STUDENT_ONNX = "student.onnx"
    STUDENT_QDQ = "student_qdq.onnx"

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            return
        if not self.path.is_dir():
            raise ModelError(f"run directory {str(self.path)!r} does not exist (run `toolchain train` first)")
        for name in (self.CONFIG, self.DATA):
            if not (self.path / name).is_file():
                raise ModelError(f"run directory {str(self.path)!r} has no {name} (run `toolchain train` first)")

    # ------------------------------------------------------------------ paths
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def reports(self) -> Path:
        return self.path / "reports"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def require(self, name: str, *, hint: str) -> Path:
        p = self.path / name
        if not p.is_file():
            raise ModelError(f"run directory {str(self.path)!r} has no {name} ({hint})")
        return p

    # ------------------------------------------------------------- records
    def data_record(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / self.DATA).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{self.path / self.DATA}: unreadable: {e}") from e

    def write_data_record(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.path / self.DATA, record)

    def report(self, command: str) -> dict[str, Any] | None:
        p = self.reports / f"{command}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def write_report(self, command: str, report: dict[str, Any]) -> Path:
        p = self.reports / f"{command}.json"
        atomic_write_json(p, report)
        return p

    def use_python_dirs(self) -> None:
        """Make the run's ``python:`` factories importable (the folders `train` recorded)."""
        from toolchain.data import add_import_dirs

        add_import_dirs(self.data_record().get("python_dirs") or ())

    def config(self) -> Any:
        from toolchain.config import load_config

        return load_config(self.path / self.CONFIG)

    # ------------------------------------------------------------- data
    def splits(self) -> "Splits":
        """Deterministic reload of the data recorded in data.json (raw, batch first)."""
        from toolchain.data import splits_from_record, with_refresh

        rec = self.data_record()
        splits = splits_from_record(rec)
        refresh = rec.get("refresh")
        if refresh:  # a refreshed run: its splits include the collected samples (toolchain refresh)
            splits = with_refresh(splits, self.path / refresh["file"], refresh.get("sha256"), self.task)
        return splits

    @property
    def input_spec(self) -> "InputSpec":
        from edgecore.spec import InputSpec

        return InputSpec.from_dict(self.data_record()["input_spec"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.data_record()["labels"])

    @property
    def task(self) -> "TrainTask":
        """The run's task (``data.json`` → ``task``; runs made before tasks existed are classification)."""
        from toolchain.tasks import get_train_task

        return get_train_task(self.data_record().get("task"))

    # ------------------------------------------------------------- models
    def load_teacher(self) -> "torch.nn.Module":
        """The trained teacher, rebuilt from its family and config, eval mode."""
        ck = load_checkpoint(self.require(self.TEACHER, hint="run `toolchain train` first"), kind="teacher")
        self.use_python_dirs()
        from toolchain.config import ModelConfig, from_dict

        try:
            mcfg: ModelConfig = from_dict({"teacher": ck["model_config"]}, origin=str(self.path / self.TEACHER)).teacher
            model = self.task.build_model(mcfg, input_shape=tuple(ck["input_shape"]), num_classes=int(ck["num_classes"]))
            model.load_state_dict(ck["state_dict"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise ModelError(f"{self.path / self.TEACHER}: checkpoint does not match its model: {e}") from e
        return model.eval()

    def load_student(self) -> "torch.nn.Module":
        """The pruned + distilled fp32 student, eval mode (its pickle may name the user's model module)."""
        self.use_python_dirs()
        ck = load_checkpoint(self.require(self.STUDENT, hint="run `toolchain compress` first"), kind="student")
        model = ck.get("model")
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"{self.path / self.STUDENT}: checkpoint holds no model")
        try:
            model.load_state_dict(ck["state_dict"])
        except (KeyError, RuntimeError) as e:
            raise ModelError(f"{self.path / self.STUDENT}: checkpoint does not match its model: {e}") from e
        return model.eval()

    def load_student_qat(self) -> "torch.nn.Module":
        """The converted QAT student (a torch.export program's module, QDQ ops inside)."""
        p = self.require(self.STUDENT_QAT, hint="run `toolchain compress` first")
        return load_program(p.read_bytes(), origin=str(p))

    def model_source(self) -> "ModelSource":
        from targets.base import ModelSource

        onnx_fp32 = self.require(self.STUDENT_ONNX, hint="run `toolchain export` first")
        qdq = self.path / self.STUDENT_QDQ
        export = self.report("export") or {}
        cfg_name = None
        try:
            import tomllib

            cfg_name = tomllib.loads((self.path / self.CONFIG).read_text()).get("run", {}).get("name")
        except (OSError, ValueError):
            pass
        return ModelSource(
            name=str(cfg_name or self.path.name),
            input_spec=self.input_spec,
            labels=self.labels,
            onnx_fp32=onnx_fp32,
            onnx_qdq=qdq if qdq.is_file() else None,
            torch_model=self.load_student,
            qdq_weight_bits=export.get("qdq_weight_bits"),
        )

    def lineage(self) -> dict[str, str | None]:
        def h(name: str) -> str | None:
            p = self.path / name
            return sha256_file(p) if p.is_file() else None

        return {"teacher_sha256": h(self.TEACHER), "student_sha256": h(self.STUDENT), "config_sha256": h(self.CONFIG)}


def load_program(data: bytes, *, origin: str) -> "torch.nn.Module":
    """A quantized program (`toolchain.passes.qat.serialize_program`'s bytes) as a module; ``origin`` names it in
    errors."""
    import torch
    import torchao.quantization.pt2e

    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # torch raises many kinds for a corrupt archive
        raise ModelError(f"{origin}: not a loadable QAT program: {e}") from e
    module = ep.module()
    # exported modules refuse .eval(); this makes .train()/.eval() safe to call
    torchao.quantization.pt2e.allow_exported_model_train_eval(module)
    return module


def save_checkpoint(path: Path, payload: dict[str, Any]) -> int:
    """Atomic ``torch.save``; returns the size in bytes."""
    import torch

    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def load_checkpoint(path: Path, *, kind: str) -> dict[str, Any]:
    import pickle
    import zipfile

    import torch

    try:
        # Our own run files: student checkpoints hold the pruned module itself.
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, AttributeError, ImportError) as e:
        raise ModelError(f"{path}: corrupt or unreadable checkpoint: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != kind:
        raise ModelError(f"{path}: not a {kind} checkpoint of this toolchain (format {CHECKPOINT_FORMAT})")
    return ck
