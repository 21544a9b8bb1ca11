"""Re-distill: continue the parent's student on original + collected data (a model soup of seeded
continuations), with the expert strategy beside the kept student behind a trained gate, then quantize."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

from edgecore.fsutil import atomic_write_bytes

from .errors import RefreshError
from .refresh_set import RefreshSet

KEPT_PROGRAM = "student_qat_kept.pt"  # a gated run: the kept student's quantized program, for the next refresh


def train(cfg: Any, out: Path, rs: RefreshSet) -> tuple[Any, Any, dict[str, Any]]:
    """Continue the parent's student on original + collected data, then the run's quantizing pass.

    Targets and loss are the run's task's (`TrainTask.refresh_loss`; a classifier: the teacher's probabilities
    on the original data, the gateway's recorded ones or a person's label on the collected samples, weighted by
    the refresh set; a detector: the ground truth and the collected boxes, distilled from the teacher). The
    quantizing pass after it trains unweighted.

    ``refresh.strategy = "expert"`` (default): the continued student becomes an expert beside the unchanged student,
    and a gate trained on original vs. collected inputs picks between them (`toolchain.models.GatedExperts`). A
    parent that is already gated keeps its student, continues its expert and gets a new gate: the model does not
    grow from one refresh to the next.
    """
    from toolchain import compress as C
    from toolchain import engine
    from toolchain.config import RefreshStrategy
    from toolchain.models import GatedExperts, count_macs, count_params
    from toolchain.passes import get_pass
    from toolchain.passes.base import stage_row, state_size
    from toolchain.rundir import RunDir

    run = RunDir(out)
    ctx = C.make_context(cfg, run)
    n_val = int(run.data_record()["refresh"]["original_val"]) or len(ctx.val[1])
    ctx.val = (ctx.val[0][:n_val], ctx.val[1][:n_val])  # early stopping never sees the held-out samples
    n_orig = len(ctx.train[1]) - len(rs.y_train)
    targets, loss_fn = ctx.train_task.refresh_loss(ctx, rs.p_train, rs.w_train, alpha=cfg.distill.alpha,
                                                   temperature=cfg.distill.temperature)

    r, t0 = cfg.refresh, time.perf_counter()
    gated = r.strategy is RefreshStrategy.EXPERT
    quant = [get_pass(n)(cfg) for n in cfg.compress.passes if get_pass(n).quantizes]
    kept = run.load_student().eval()  # the parent's student: kept as is (expert), and where continuations start
    kept_program: bytes | None = None
    if gated and quant:  # before any training: without it, the kept student's int8 answers could not stay its own
        kept_program = _kept_program(run, kept)
    # what a continuation starts from: the student, or a gated parent's expert
    start = kept.expert if gated and isinstance(kept, GatedExperts) else kept
    states, cand_acc = [], []
    for k in range(r.candidates):
        student = copy.deepcopy(start).train()
        engine.fit(student, loss_fn=loss_fn, metric=ctx.train_task.model_metric, train=(ctx.train[0], targets),
                   val=ctx.val,
                   opts=ctx.fit_options(epochs=r.epochs, lr=r.lr, desc=f"refresh {k + 1}/{r.candidates}",
                                        seed_offset=500 + k, warmup_epochs=0, patience=r.epochs))
        student = student.cpu().eval()
        states.append({n: v.detach().clone() for n, v in student.state_dict().items()})
        cand_acc.append(ctx.metric(student, ctx.test))
    if len(states) > 1:
        soup(student, states, ctx.train[0])
    name = "refreshed (distilled, continued)" + (f"; {len(states)} averaged" if len(states) > 1 else "")
    gate_report: dict[str, Any] | None = None
    if gated:
        expert_acc = ctx.metric(student, ctx.test)
        gate = train_gate(ctx.train[0], n_orig, seed=cfg.run.seed)
        x_hold = engine.normalise(rs.x_val, ctx.input_spec) if len(rs.y_val) else ctx.val[0][:0]
        gate_report = {"expert_test_accuracy": expert_acc, **gate_routing(gate, ctx.val[0], x_hold),
                       "params": count_params(gate)}
        before = {"params": count_params(kept), "macs": count_macs(kept, ctx.input_shape)}
        student = GatedExperts(kept.base if isinstance(kept, GatedExperts) else kept, student, gate).eval()
        # the price: one more student (and the gate) run per input
        gate_report["growth"] = {"params_before": before["params"], "params_after": count_params(student),
                                 "macs_before": before["macs"], "macs_after": count_macs(student, ctx.input_shape)}
        name = f"student kept + expert ({name}) + gate"
    row = stage_row(name, student, ctx, size=state_size(student), seconds=time.perf_counter() - t0)
    if kept_program is not None:
        res = _quantize_gated(quant, student, kept_program, ctx)
    else:
        res = C.run_passes(quant, student, ctx, label="refreshed: ")
    report = {"stages": [row, *res.rows], "student_accuracy": row["test_accuracy"],
              "qat_accuracy": res.rows[-1]["test_accuracy"] if res.quantizer else None,
              "candidates_test_accuracy": cand_acc, "strategy": r.strategy.value, "gate": gate_report}
    C._write_outputs(run, res, ctx, report)
    kept_path = run.path / KEPT_PROGRAM
    if kept_program is not None:
        atomic_write_bytes(kept_path, kept_program)  # what the next refresh keeps
    else:
        kept_path.unlink(missing_ok=True)
    return res, ctx, report


def _kept_program(run: Any, kept: Any) -> bytes:
    """The quantized program of the student a gated refresh keeps: the parent's own (a gated parent: its kept one).

    Read before this run's outputs replace the parent's files."""
    from toolchain.models import GatedExperts
    from toolchain.rundir import RunDir

    p = run.path / (KEPT_PROGRAM if isinstance(kept, GatedExperts) else RunDir.STUDENT_QAT)
    if not p.is_file():
        raise RefreshError(f"the parent run has no quantized program ({p.name}) for the student that refresh.strategy "
                           f"'expert' keeps: run `toolchain compress` on it, or set refresh.strategy = 'continue'")
    return p.read_bytes()


def _quantize_gated(quant: list[Any], model: Any, kept_program: bytes, ctx: Any) -> Any:
    """The quantizing passes on the expert alone, then one program: the kept student's quantized program as it
    shipped (its answers unchanged, bit for bit), the quantized expert, and the gate in float."""
    from toolchain import compress as C
    from toolchain.models import GatedExperts
    from toolchain.passes.base import stage_row
    from toolchain.passes.qat import serialize_program
    from toolchain.rundir import load_program

    res = C.run_passes(quant, model.expert, ctx, label="refreshed expert: ")
    composite = GatedExperts(load_program(kept_program, origin="the kept student's program"), res.quantized,
                             model.gate)
    program = serialize_program(composite, ctx.input_shape)
    res.rows = [stage_row(f"refreshed: {res.quantizer} (kept student's program + expert + gate)", model, ctx,
                          size=len(program), seconds=res.rows[-1]["seconds"],
                          accuracy=ctx.metric(composite, ctx.test), quantized=True)]
    res.student, res.quantized, res.program = model, composite, program
    return res


def train_gate(x: Any, n_orig: int, *, seed: int, epochs: int = 40, lr: float = 3e-3, batch_size: int = 128) -> Any:
    """A `toolchain.models.DomainGate` trained to answer high for ``x[:n_orig]`` (the original training inputs) and
    low for the rest (the collected ones), each side weighing half whatever its size; eval mode."""
    import torch
    import torch.nn.functional as F

    from toolchain.models import DomainGate

    n = len(x)
    if not 0 < n_orig < n:
        raise RefreshError(f"a gate needs original and collected inputs (got {n_orig} of {n} original)")
    gen = torch.Generator().manual_seed(int(seed) + 700)
    torch.manual_seed(int(seed) + 700)
    gate = DomainGate(tuple(x.shape[1:]))
    dom = torch.cat([torch.ones(n_orig), torch.zeros(n - n_orig)])
    w = torch.where(dom > 0, 0.5 / n_orig, 0.5 / (n - n_orig)) * n
    opt = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=1e-4)
    gate.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            b = perm[i : i + batch_size]
            loss = (F.binary_cross_entropy_with_logits(gate(x[b]).squeeze(1), dom[b], reduction="none") * w[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return gate.eval()


def gate_routing(gate: Any, x_original: Any, x_collected: Any) -> dict[str, float | None]:
    """Shares the gate sends the right way: original inputs to the student (g > 0.5), collected ones to the expert."""
    import torch

    def share_to_student(x: Any) -> float | None:
        if len(x) == 0:
            return None
        with torch.no_grad():
            return float((torch.sigmoid(gate(x)) > 0.5).float().mean())

    to_expert = share_to_student(x_collected)
    return {"original_val_to_student": share_to_student(x_original),
            "held_out_to_expert": None if to_expert is None else 1.0 - to_expert}


def soup(model: Any, states: list[dict[str, Any]], x: Any, *, batch_size: int = 256) -> None:
    """Load into ``model`` the average of ``states`` (a uniform model soup), then re-estimate BatchNorm on ``x``.

    The states are continuations of one model (same start, different seeds), so their average stays in the same
    basin and is at least as good as a typical one (Wortsman et al., 2022, "Model soups"); what differs between
    seeds (the answers that flip at random) is averaged away. Integer buffers (BatchNorm's step count) come from
    the first state. Averaged weights no longer match the averaged BatchNorm statistics, so those are measured
    again: reset, then one pass over ``x`` with a cumulative average, no gradients. Not
    ``torch.optim.swa_utils.update_bn``: it puts the whole model in train mode, so in the MLP family (Linear,
    BatchNorm, ReLU, Dropout, repeated) each later BatchNorm would measure dropout-scaled inputs it never sees at
    inference; and it keeps autograd on.
    """
    import torch

    model.load_state_dict({n: (sum(s[n] for s in states) / len(states)) if v.is_floating_point() else v
                           for n, v in states[0].items()})
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative: every batch counts the same
        model.eval()
        for m in bns:
            m.train()  # only BatchNorm: dropout and the like stay off while measuring
        with torch.no_grad():
            for xb in torch.tensor_split(x, max(1, math.ceil(len(x) / batch_size))):  # equal sizes: the
                model(xb)  # cumulative average weighs batches, not inputs, so no short last batch
        for m, mo in zip(bns, momenta, strict=True):
            m.momentum = mo
    model.eval()
