"""The one training loop every stage uses (teacher, pruning fine-tune, KD, QAT).

AdamW with a warm-up + cosine schedule, early stopping on validation accuracy
(the best weights are kept, not the last), a per-epoch callback for
checkpoints, AMP only when CUDA is present, and DistributedDataParallel when
``torch.distributed`` is initialised (``torchrun``: gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecore.spec import InputSpec

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]  # the task's (toolchain.tasks)
MetricFn = Callable[[nn.Module, torch.Tensor, Any], float]  # the task's model_metric: higher is better
AugmentFn = Callable[[torch.Tensor, Any, "FitOptions"], "tuple[torch.Tensor, Any]"]  # the task's augment


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda", _local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(backend=backend)
    return True


def normalise(X: np.ndarray, spec: InputSpec) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(spec.preprocess(X)))


def shift_augment(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge-replicated), images only."""
    if x.ndim != 4 or max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    rows = (torch.arange(h)[None, :] + dy[:, None])  # (n, h)
    cols = (torch.arange(w)[None, :] + dx[:, None])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    # Not ``.contiguous()``: with one channel the permuted view already counts as contiguous, so it is
    # returned as is, strides (H*W, 1, W, 1), which torch reads as channels_last. The whole network then
    # runs NHWC through oneDNN, whose 1x1 stride-2 conv backward-weights kernel (jit_1x1:avx2, fewer than
    # 8 input channels) writes past its buffer: heap corruption, SIGABRT/SIGBUS in backward. Real NCHW.
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def broad_augment(x: torch.Tensor, *, rotate_deg: float, noise_std: float, fraction: float) -> torch.Tensor:
    """Rotate a random ``fraction`` of the batch by up to ±``rotate_deg`` and add gaussian noise to it.

    The cloud model's broader training data (issue 13): inputs a drifted device
    may send (turned, noisy) next to the clean ones. Draws come from torch's
    global generator, seeded by the run. Images only for the rotation.
    """
    n = x.shape[0]
    pick = torch.rand(n) < fraction
    if not bool(pick.any()):
        return x
    sub = x[pick]
    if rotate_deg > 0 and sub.ndim == 4:
        theta = (torch.rand(sub.shape[0]) * 2 - 1) * math.radians(rotate_deg)
        cos, sin = torch.cos(theta), torch.sin(theta)
        mat = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                           torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(mat, list(sub.shape), align_corners=False)
        fill = sub.amin(dim=(1, 2, 3), keepdim=True)  # the background, not zero (normalised inputs)
        sub = F.grid_sample(sub - fill, grid, align_corners=False, padding_mode="zeros") + fill
    if noise_std > 0:
        sub = sub + torch.randn_like(sub) * noise_std
    out = x.clone()
    out[pick] = sub
    return out


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = [model(X[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(X), batch_size)]
    model.train(was)
    return torch.cat(outs)


@dataclass
class FitState:
    """Everything needed to resume: written as the per-epoch checkpoint."""

    epoch: int = 0  # epochs completed
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitState":
        return cls(**d)


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    patience: int | None = None  # None: no early stopping
    batch_size: int = 64
    augment: bool = False
    amp: bool = True
    desc: str = "train"
    progress: bool = True
    seed: int = 0
    restore_best: bool = True
    rotate_deg: float = 0.0  # broader data (the teacher): random rotations up to this, images only
    noise_std: float = 0.0  # ... and gaussian noise, on broad_fraction of each batch
    broad_fraction: float = 0.5
    # the view a task's augment makes (distillation's consistent view, and the control that matches it)
    shift: int = 1  # with ``augment``: random shifts up to this many pixels (signals: samples)
    flip: bool = False  # with ``augment``: mirror half the batch (the task says whether it can)
    mix: str = "none"  # "none" | "mixup" | "cutmix": pairs of inputs mixed (the targets with them)
    mix_alpha: float = 1.0  # the mixing weight is drawn from Beta(mix_alpha, mix_alpha)


def _loader(train: tuple[torch.Tensor, torch.Tensor], opts: FitOptions) -> tuple[Any, Any]:
    """(DataLoader, DistributedSampler or None) over the training split."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    ds = TensorDataset(train[0], train[1])
    sampler = DistributedSampler(ds, seed=opts.seed, shuffle=True) if is_distributed() else None
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(
        ds, batch_size=opts.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen, drop_last=len(ds) > opts.batch_size
    )
    return loader, sampler


def _optimizer(model: nn.Module, opts: FitOptions, steps_per_epoch: int) -> tuple[Any, Any]:
    """AdamW and a warm-up + cosine schedule stepped per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    total = opts.epochs * steps_per_epoch
    warm = opts.warmup_epochs * steps_per_epoch

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def steps_per_epoch(n_train: int, opts: FitOptions) -> int:
    """Optimizer steps one epoch of `fit` takes on ``n_train`` samples (the loader drops a last short batch)."""
    per_rank = math.ceil(n_train / world_size())
    drop_last = n_train > opts.batch_size  # as `_loader`
    return per_rank // opts.batch_size if drop_last else math.ceil(per_rank / opts.batch_size)


@dataclass
class _Loop:
    """What one epoch of `fit` needs besides the model."""

    wrapped: nn.Module
    loader: Any
    loss_fn: LossFn
    augment: AugmentFn
    opt: Any
    sched: Any
    scaler: Any
    dev: Any
    use_amp: bool
    show: bool


def _train_epoch(loop: _Loop, opts: FitOptions, epoch: int) -> float:
    """One pass over the loader; returns the mean training loss."""
    from tqdm.auto import tqdm

    from edgecore.clikit import on_terminal

    total_loss, n = 0.0, 0
    bar = tqdm(loop.loader, desc=f"{opts.desc} {epoch + 1}/{opts.epochs}", leave=False,
               disable=not loop.show or not on_terminal(), unit="batch")
    for xb, yb in bar:
        xb, yb = loop.augment(xb.to(loop.dev), yb.to(loop.dev), opts)
        with torch.autocast("cuda", dtype=torch.float16, enabled=loop.use_amp):
            loss = loop.loss_fn(loop.wrapped, xb, yb)
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        loop.sched.step()
        total_loss += float(loss.detach()) * len(xb)
        n += len(xb)
        bar.set_postfix(loss=f"{total_loss / max(n, 1):.4f}")
    bar.close()
    return total_loss / max(n, 1)


def eta_text(seconds_per_epoch: float, state: FitState, opts: FitOptions) -> str:
    """``2.1 s/epoch, ETA 57 s`` (at most: early stopping may end it sooner), or "" when the run has ended."""
    left = opts.epochs - state.epoch
    if opts.patience is not None:
        left = min(left, opts.patience - state.bad_epochs)  # the most early stopping lets it run
    if left <= 0 or state.stopped_early:
        return ""
    eta = seconds_per_epoch * left
    when = f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min"
    return f", {seconds_per_epoch:.1f} s/epoch, ETA ≤ {when}"


def _end_epoch(state: FitState, model: nn.Module, opts: FitOptions, epoch: int, loss: float, val_acc: float,
               show: bool, seconds: float | None = None) -> None:
    """Record the epoch, keep the best weights, apply early stopping, report the line."""
    from tqdm.auto import tqdm

    state.epoch = epoch + 1
    state.history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": val_acc})
    if val_acc > state.best_acc:
        state.best_acc, state.best_epoch, state.bad_epochs = val_acc, epoch + 1, 0
        state.best_state = copy.deepcopy(model.state_dict())
    else:
        state.bad_epochs += 1
        if opts.patience is not None and state.bad_epochs >= opts.patience:
            state.stopped_early = True
    line = (
        f"{opts.desc} epoch {epoch + 1}/{opts.epochs}: loss {loss:.4f} "
        f"val_acc {val_acc:.4f} (best {state.best_acc:.4f} @ {state.best_epoch})"
    ) + (eta_text(seconds, state, opts) if seconds is not None else "")
    if show:
        tqdm.write(line)
    elif rank() == 0:
        log.info(line)


def fit(
    model: nn.Module,
    *,
    loss_fn: LossFn,
    metric: MetricFn,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    opts: FitOptions,
    state: FitState | None = None,
    on_epoch_end: Callable[[FitState], None] | None = None,
    eval_model: Callable[[], nn.Module] | None = None,
    augment: AugmentFn | None = None,
) -> FitState:
    """Train ``model`` in place; returns the final state (best weights loaded).

    ``loss_fn``, ``metric`` and ``augment`` are the task's (`toolchain.tasks.TrainTask`): the loop selects the
    epoch with the best ``metric`` on ``val``; ``augment`` (default: classification's) changes each batch.
    """
    if augment is None:
        from toolchain.tasks import get_train_task

        augment = get_train_task().augment
    dev = device()
    model.to(dev)
    loader, sampler = _loader(train, opts)
    wrapped: nn.Module = model
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt, sched = _optimizer(model, opts, max(1, len(loader)))
    state = state or FitState()
    if state.model is not None:
        model.load_state_dict(state.model)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        sched.load_state_dict(state.scheduler)
    use_amp = opts.amp and dev.type == "cuda"
    loop = _Loop(wrapped, loader, loss_fn, augment, opt, sched, torch.amp.GradScaler("cuda", enabled=use_amp), dev, use_amp,
                 opts.progress and rank() == 0)
    Xv, yv = val
    while state.epoch < opts.epochs and not state.stopped_early:
        epoch = state.epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        torch.manual_seed(opts.seed * 1000 + epoch)
        model.train()
        t_epoch = time.perf_counter()
        loss = _train_epoch(loop, opts, epoch)
        m = eval_model() if eval_model is not None else model
        _end_epoch(state, model, opts, epoch, loss, metric(m, Xv, yv), loop.show, time.perf_counter() - t_epoch)
        state.model, state.optimizer, state.scheduler = model.state_dict(), opt.state_dict(), sched.state_dict()
        if on_epoch_end is not None:
            on_epoch_end(state)
    if opts.restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    return state
