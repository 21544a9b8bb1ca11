"""``toolchain train``: train the teacher into a run directory.

Writes config.toml and data.json first (so the split is recorded even if the
run is interrupted), a checkpoint every epoch (``checkpoints/last.pt``, what
``--resume`` continues from), then teacher.pt and reports/train.json. Under
``torchrun`` every rank trains its shard (DDP) and rank 0 writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgecore.errors import ModelError
from edgecore.fsutil import atomic_write_text
from edgecore.tasks import TaskSpec
from toolchain.config import Config, to_dict, to_toml
from toolchain.rundir import RunDir, load_checkpoint, save_checkpoint

# Files of later stages: stale once the teacher is retrained.
_DOWNSTREAM = (
    RunDir.STUDENT, RunDir.STUDENT_QAT, RunDir.TEACHER_ONNX, RunDir.STUDENT_ONNX, RunDir.STUDENT_QDQ,
    "reports/compress.json", "reports/export.json",
)


def _resume_state(last: Path, splits: Any, cfg: Config) -> Any:
    """The saved training state to continue from, refused when data or teacher config changed."""
    from toolchain import engine

    if not last.is_file():
        raise ModelError(f"--resume: {last} does not exist (nothing to resume)")
    ck = load_checkpoint(last, kind="train-state")
    if ck.get("data_sha256") != splits.sha256 or ck.get("model_config") != to_dict(cfg)["teacher"]:
        raise ModelError(f"--resume: {last} was made with another data set or teacher config")
    return engine.FitState.from_dict(ck["state"])


def _fit_options(cfg: Config, input_shape: tuple[int, ...]) -> Any:
    from toolchain import engine

    t = cfg.train
    return engine.FitOptions(
        epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs, patience=t.patience,
        batch_size=cfg.data.batch_size, augment=t.augment and len(input_shape) == 3, amp=t.amp, desc="teacher",
        progress=t.progress, seed=cfg.run.seed, rotate_deg=t.rotate_deg, noise_std=t.noise_std,
        broad_fraction=t.broad_fraction,
    )


def _report(cfg: Config, run: RunDir, splits: Any, model: Any, input_shape: tuple[int, ...], state: Any,
            test_acc: float, resume: bool, t0: float) -> dict[str, Any]:
    import torch

    from toolchain import engine
    from toolchain.models import count_macs, count_params

    return {
        "command": "train",
        "run_dir": str(run.path),
        "data": {"source": cfg.data.source, "sha256": splits.sha256,
                 "splits": {k: int(len(getattr(splits, k)[1])) for k in ("train", "val", "test")}},
        "teacher": {
            "family": cfg.teacher.family,
            "params": count_params(model),
            "macs": count_macs(model, input_shape),
            "size_bytes": 0,
        },
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "resumed": resume,
        "val_accuracy": state.best_acc,
        "test_accuracy": test_acc,
        "history": state.history,
        "world_size": engine.world_size(),
        "device": str(engine.device()),
        "amp": bool(cfg.train.amp and torch.cuda.is_available()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train(cfg: Config, run_dir: Path | str | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Train the teacher; returns the train report (also written to reports/train.json)."""
    import torch

    from toolchain import engine, recipes
    from toolchain.data import add_import_dirs, data_record, import_dirs, load_splits
    from toolchain.tasks import get_train_task, train_task_class

    t0 = time.perf_counter()
    distributed = engine.init_distributed()
    is_main = engine.rank() == 0
    path = Path(run_dir) if run_dir is not None else cfg.run.dir
    engine.set_seed(cfg.run.seed)
    python_dirs = import_dirs(cfg)
    add_import_dirs(python_dirs)
    task_cls = train_task_class(cfg.task.name)
    splits = load_splits(cfg.data, seed=cfg.run.seed, task=task_cls)
    spec = splits.input_spec
    input_shape = spec.sample_shape
    model = task_cls.build_model(cfg.teacher, input_shape=input_shape, num_classes=splits.num_classes)
    cfg, recipe = recipes.resolve(cfg, model)  # the family's training recipe on every key the config left unset
    task_spec: TaskSpec = task_cls.task_spec(model, input_shape)  # the task's parameters (a detector's decoding)
    run = RunDir(path, create=True)
    last = run.checkpoints / "last.pt"
    state = _resume_state(last, splits, cfg) if resume else None
    if is_main:
        if not resume:
            for name in _DOWNSTREAM:
                (run.path / name).unlink(missing_ok=True)
        atomic_write_text(run.file(RunDir.CONFIG), to_toml(cfg))
        run.write_data_record(data_record(splits, cfg.data, seed=cfg.run.seed, python_dirs=python_dirs,
                                          task=task_spec))

    Xtr, ytr = engine.normalise(splits.train[0], spec), torch.from_numpy(splits.train[1])
    Xv, yv = engine.normalise(splits.val[0], spec), torch.from_numpy(splits.val[1])
    Xte, yte = engine.normalise(splits.test[0], spec), torch.from_numpy(splits.test[1])

    def checkpoint(st: engine.FitState) -> None:
        if is_main:
            save_checkpoint(last, {
                "kind": "train-state", "state": st.to_dict(), "data_sha256": splits.sha256,
                "model_config": to_dict(cfg)["teacher"],
            })

    task = get_train_task(task_spec)
    state = engine.fit(
        model, loss_fn=task.loss(label_smoothing=cfg.train.label_smoothing), metric=task.model_metric, augment=task.augment,
        train=(Xtr, ytr), val=(Xv, yv),
        opts=_fit_options(cfg, input_shape), state=state, on_epoch_end=checkpoint,
    )
    model = model.cpu().eval()
    test_acc = task.model_metric(model, Xte, yte)
    report = _report(cfg, run, splits, model, input_shape, state, test_acc, resume, t0)
    report["recipe"] = recipe
    if is_main:
        report["teacher"]["size_bytes"] = save_checkpoint(run.file(RunDir.TEACHER), {
            "kind": "teacher",
            "model_config": to_dict(cfg)["teacher"],
            "input_shape": list(input_shape),
            "num_classes": splits.num_classes,
            "state_dict": model.state_dict(),
            "test_accuracy": test_acc,
        })
        run.write_report("train", report)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    return report


