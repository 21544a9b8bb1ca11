"""``toolchain refresh``: the closed loop's training step.

The gateway collects what the fleet was unsure of, answered by the teacher
(docs/gateway.md, "Collected samples"). ``refresh`` pulls those samples (over
HTTP from the gateway, or straight from its database), builds a refresh set
(label = a person's label if given, else the teacher's; de-duplicated by
content; a seeded held-out part kept out of training; classes evened out,
``refresh.balance``: oversampled by default, or by loss weights), writes a
NEW run that is the parent run plus that set (``data.json`` → ``refresh``: its
splits are the source's plus the collected train part, val plus the held-out
part, test unchanged), and there:

1. re-distills the parent's current student from the teacher, continuing from
   its weights (not from scratch), on the original training data plus the
   refresh set (early stopping on the original validation split only);
   ``refresh.candidates`` such continuations, one seed each, are averaged into
   one model (a uniform model soup, BatchNorm re-estimated): fewer answers on
   the original data flip at random, which is what the regression gate counts;
   with ``refresh.strategy = "expert"`` (default) that model becomes an expert
   beside the unchanged student, and a small gate trained to tell the original
   training inputs from the collected ones picks per input
   (`toolchain.models.GatedExperts`): the student's answers on inputs like its
   training data stay its own;
2. re-runs the quantizing pass (QAT) and the export (with the expert strategy:
   on the expert alone, composed with the kept student's quantized program as
   it shipped, so that its answers do not move);
3. builds a bundle for each target the parent run had built (the production
   targets), whose calibration, routing threshold and drift reference are
   refitted on splits that now include the shifted inputs (the drift reference: with ``--device``, the
   collected held-out inputs, what that device now sees; without, the mixture);
4. checks the gates: at most ``refresh.max_regression_pt`` lost on the
   original test split, and better than the parent's bundle, per target, on the
   held-out collected samples. A failed gate keeps the report and removes the
   new bundles (``--force`` keeps them).

Provenance (``reports/refresh.json``): parent run, the sample ids used, their
count and sha256, every gate with its numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.errors import EdgeError
from edgecore.fsutil import atomic_write_bytes
from edgecore.samples import Sample, SampleError, SamplePage

TOKEN_ENV = "EDGE_GATEWAY_TOKEN"
REFRESH_FILE = "refresh/refresh_set.npz"
KEPT_PROGRAM = "student_qat_kept.pt"  # a gated run: the kept student's quantized program, for the next refresh
_SKIP = ("bundles", "checkpoints", "latency", "refresh", "reports")


class RefreshError(EdgeError):
    """A refresh that cannot run, or whose gates failed (the report says which)."""


# --- pulling samples -------------------------------------------------------------------------
def load_samples(source: str, *, token: str | None = None, device: str | None = None,
                 page_size: int = 500) -> list[Sample]:
    """Every collected sample at ``source`` (gateway URL, database URL or SQLite path), oldest first."""
    if source.startswith(("http://", "https://")):
        return _from_gateway(source, token=token, device=device, page_size=page_size)
    return _from_database(source, device=device)


def _from_gateway(url: str, *, token: str | None, device: str | None, page_size: int) -> list[Sample]:
    out: list[Sample] = []
    after: int | None = 0
    while after is not None:
        q = {"after": after, "limit": page_size, **({"device": device} if device else {})}
        req = urllib.request.Request(f"{url.rstrip('/')}/api/samples?{urllib.parse.urlencode(q)}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                page = SamplePage.from_json(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            hint = f" (give the gateway's token: --token or ${TOKEN_ENV})" if e.code in (401, 403) else ""
            raise RefreshError(f"gateway {url} refused the samples request: HTTP {e.code}{hint}") from e
        except (urllib.error.URLError, OSError) as e:
            raise RefreshError(f"cannot reach gateway {url}: {getattr(e, 'reason', e)}") from e
        except (ValueError, SampleError) as e:
            raise RefreshError(f"gateway {url} answered something that is not a samples page: {e}") from e
        out += page.samples
        after = page.next_after
    return out


def _from_database(spec: str, *, device: str | None) -> list[Sample]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    url = spec if "://" in spec else f"sqlite:///{Path(spec).resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite") and not Path(url.split("sqlite:///", 1)[-1]).is_file():
        raise RefreshError(f"no gateway database at {spec}")
    try:
        engine = create_engine(url)
        with engine.connect() as c:
            q = "SELECT * FROM samples" + (" WHERE device_id = :d" if device else "") + " ORDER BY id"
            rows = [dict(r) for r in c.execute(text(q), {"d": device} if device else {}).mappings()]
    except (SQLAlchemyError, ImportError) as e:
        raise RefreshError(f"cannot read collected samples from {spec}: {str(e).splitlines()[0]}") from e
    try:
        return [Sample.from_row(r) for r in rows]
    except SampleError as e:
        raise RefreshError(f"{spec}: {e}") from e


# --- the refresh set -------------------------------------------------------------------------
@dataclass
class RefreshSet:
    x_train: np.ndarray  # raw (un-normalised), like every split of a run
    y_train: np.ndarray
    x_val: np.ndarray  # the held-out collected samples
    y_val: np.ndarray
    p_train: np.ndarray  # soft targets of the train part: a person's label one-hot, else the teacher's probabilities
    w_train: np.ndarray  # loss weight per train sample (balance "weight": each class the same total, mean 1; else 1)
    ids_train: list[int]
    ids_holdout: list[int]
    duplicates: int
    human_labels: int
    sha256: str


def _raw(x: np.ndarray, spec: Any) -> np.ndarray:
    """Undo ``InputSpec.preprocess`` (samples hold what the device's model took)."""
    x = np.asarray(x, np.float32)
    if spec.mean:
        b = (1, len(spec.mean)) + (1,) * (x.ndim - 2)
        x = x * np.asarray(spec.std, np.float32).reshape(b) + np.asarray(spec.mean, np.float32).reshape(b)
    return (x / np.float32(spec.scale)).astype(np.float32)


def build_refresh_set(samples: list[Sample], spec: Any, num_classes: int, *, holdout: float, seed: int,
                      balance: Any, min_samples: int) -> RefreshSet:
    """``balance``: a `toolchain.config.Balance` or its value (an older config's boolean is mapped when it loads)."""
    from toolchain.config import Balance

    mode = Balance(balance)
    shape = tuple(spec.sample_shape)
    keep: dict[str, Sample] = {}
    for s in samples:
        x = s.input[0] if s.input.ndim == len(shape) + 1 and s.input.shape[0] == 1 else s.input
        if tuple(x.shape) != shape:
            raise RefreshError(f"sample {s.id} from {s.device}: input shape {list(s.input.shape)} does not match the "
                               f"run's {list(shape)} (samples of another model?)")
        if not 0 <= s.label < num_classes:
            raise RefreshError(f"sample {s.id}: label {s.label} outside the run's {num_classes} classes")
        key = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()
        if key not in keep or (s.human_label is not None and keep[key].human_label is None):
            keep[key] = dataclasses.replace(s, input=np.asarray(x, np.float32))
    uniq = sorted(keep.values(), key=lambda s: s.id)
    if len(uniq) < min_samples:
        raise RefreshError(f"{len(uniq)} distinct collected samples (of {len(samples)}); refresh.min_samples is "
                           f"{min_samples}: collect longer (cloud-gateway serve --collect ...)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_hold = max(1, int(round(holdout * len(uniq))))
    hold, train = [uniq[i] for i in order[:n_hold]], [uniq[i] for i in order[n_hold:]]
    idx = np.arange(len(train))
    y_tr = np.array([s.label for s in train], np.int64)
    w_tr = np.ones(len(train), np.float32)
    counts = np.bincount(y_tr, minlength=num_classes)
    if mode is Balance.OVERSAMPLE and len(train):
        target = counts[counts > 0].max()
        extra = [rng.choice(np.flatnonzero(y_tr == c), target - n) for c, n in enumerate(counts) if 0 < n < target]
        idx = np.concatenate([idx, *extra]) if extra else idx
        w_tr = np.ones(len(idx), np.float32)
    elif mode is Balance.WEIGHT and len(train):
        # every present class weighs the same in total and the weights average 1: the classes are even, and the
        # collected part's share of the training loss stays what was collected (oversampling grows it)
        w_tr = (len(train) / (np.count_nonzero(counts) * counts[y_tr])).astype(np.float32)
    x_tr = _raw(np.stack([train[i].input for i in idx]), spec) if len(idx) else np.zeros((0, *shape), np.float32)
    p_tr = np.stack([_target(train[i], num_classes) for i in idx]) if len(idx) else np.zeros((0, num_classes), np.float32)
    parts = {"x_train": x_tr, "y_train": y_tr[idx] if len(idx) else np.zeros(0, np.int64),
             "x_val": _raw(np.stack([s.input for s in hold]), spec), "y_val": np.array([s.label for s in hold], np.int64)}
    from toolchain.data import refresh_digest

    return RefreshSet(**parts, p_train=p_tr, w_train=w_tr, ids_train=[s.id for s in train],
                      ids_holdout=[s.id for s in hold], duplicates=len(samples) - len(uniq),
                      human_labels=sum(s.human_label is not None for s in uniq), sha256=refresh_digest(parts))


def _target(s: Sample, num_classes: int) -> np.ndarray:
    if s.human_label is not None or s.teacher_probs.shape != (num_classes,):
        return np.eye(num_classes, dtype=np.float32)[s.label]
    p = np.clip(s.teacher_probs.astype(np.float32), 0, None)
    return p / max(float(p.sum()), 1e-12)


# --- the new run ---------------------------------------------------------------------------------
def _new_run(parent: Path, out: Path, rs: RefreshSet, source: str, device: str | None = None) -> None:
    import io

    from toolchain.rundir import RunDir

    if out.exists() and any(out.iterdir()):
        raise RefreshError(f"{out} exists and is not empty: give a new --out for the refreshed run")
    shutil.copytree(parent, out, ignore=lambda d, names: [n for n in names if Path(d) == parent and n in _SKIP],
                    dirs_exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x_train=rs.x_train, y_train=rs.y_train, x_val=rs.x_val, y_val=rs.y_val)
    atomic_write_bytes(out / REFRESH_FILE, buf.getvalue())
    run = RunDir(out)
    rec = run.data_record()
    rec["refresh"] = {"file": REFRESH_FILE, "sha256": rs.sha256, "parent": str(parent.resolve()), "source": source,
                      "train": int(len(rs.y_train)), "val": int(len(rs.y_val)),
                      "original_val": int(rec.get("splits", {}).get("val", 0)),
                      # a refresh for one device: its drift reference is what that device now sees (the collected
                      # held-out inputs); for the whole fleet, the mixture (validation split plus them)
                      "drift_from": "collected" if device else "mixture"}
    run.write_data_record(rec)


def _production_targets(parent: Path, targets: list[str] | None) -> list[tuple[str, str]]:
    names = list(targets or [])
    if not names and (parent / "bundles").is_dir():
        names = sorted(p.name for p in (parent / "bundles").iterdir() if p.is_dir() and (p / "manifest.json").is_file())
    out = []
    for n in names or ["onnx-int8"]:
        t, _, p = n.rpartition("-")
        if not t:
            raise RefreshError(f"target {n!r}: expected TARGET-PRECISION such as onnx-int8")
        out.append((t, p))
    return out


def bundle_accuracy(bundle: Path, x_raw: np.ndarray, y: np.ndarray) -> float:
    """A built bundle's accuracy on raw inputs: its model alone (own preprocessing, one input at a time, no routing)."""
    from edgecore.bundle import open_bundle
    from targets import load_runner

    b = open_bundle(bundle)  # our own build's hashes are checked; whose signature it carries does not matter here
    runner = load_runner(b)
    x = b.input_spec.preprocess(x_raw)
    pred = np.concatenate([np.asarray(runner.run(x[i:i + 1])).argmax(1) for i in range(len(x))])
    return float((pred == y).mean())


def _train(cfg: Any, out: Path, rs: RefreshSet) -> tuple[Any, Any, dict[str, Any]]:
    """Continue the parent's student on original + collected data, then the run's quantizing pass.

    Targets: on the original training data the teacher's probabilities (distillation) and the labels; on the
    collected samples the teacher's probabilities *as the gateway recorded them* (or a person's label, one-hot,
    which overrides the teacher) and their labels. Loss: ``alpha`` soft cross-entropy + ``1 - alpha`` hard, per
    sample, averaged with the refresh set's weights (original inputs weigh 1). The quantizing pass after it trains
    unweighted.

    ``refresh.strategy = "expert"`` (default): the continued student becomes an expert beside the unchanged student,
    and a gate trained on original vs. collected inputs picks between them (`toolchain.models.GatedExperts`). A
    parent that is already gated keeps its student, continues its expert and gets a new gate: the model does not
    grow from one refresh to the next.
    """
    import time as _time

    import torch
    import torch.nn.functional as F

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
    with torch.no_grad():
        t_probs = torch.softmax(engine.predict(ctx.teacher, ctx.train[0][:n_orig]).float(), 1)
    soft = torch.cat([t_probs, torch.from_numpy(rs.p_train)])
    weight = torch.cat([torch.ones(n_orig), torch.from_numpy(rs.w_train)])
    targets = torch.cat([soft, ctx.train[1][:, None].float(), weight[:, None]], 1)  # [probs..., label, weight]
    alpha = cfg.distill.alpha

    def loss_fn(model: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = model(xb)
        w = yb[:, -1]
        soft_ce = -(yb[:, :-2] * F.log_softmax(logits, 1)).sum(1)
        hard = F.cross_entropy(logits, yb[:, -2].long(), reduction="none")
        return ((alpha * soft_ce + (1 - alpha) * hard) * w).sum() / w.sum()

    r, t0 = cfg.refresh, _time.perf_counter()
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
    row = stage_row(name, student, ctx, size=state_size(student), seconds=_time.perf_counter() - t0)
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


def refresh(*, parent: Path | str, out: Path | str, source: str, token: str | None = None, device: str | None = None,
            targets: list[str] | None = None, signing_key: Any = None, force: bool = False,
            show: bool = True) -> dict[str, Any]:
    """Run the refresh (module docstring); returns the report (also RUN/reports/refresh.json)."""
    from toolchain import engine, pipeline
    from toolchain.bundle import build_bundle
    from toolchain.rundir import RunDir

    t0 = time.perf_counter()
    parent, out = Path(parent), Path(out)
    prun = RunDir(parent)
    cfg = prun.config()
    engine.set_seed(cfg.run.seed)
    samples = load_samples(source, token=token, device=device)
    spec, labels = prun.input_spec, prun.labels
    rs = build_refresh_set(samples, spec, len(labels), holdout=cfg.refresh.holdout_fraction, seed=cfg.run.seed,
                           balance=cfg.refresh.balance, min_samples=cfg.refresh.min_samples)
    _new_run(parent, out, rs, source, device)
    res, ctx, trained = _train(cfg, out, rs)
    pipeline.export(cfg, out, show=False)
    parent_correct = _shipped_correct(prun, ctx.test)  # once: the accuracy and the paired comparison both read it
    before = float(parent_correct.mean())
    new_acc = trained["qat_accuracy"] if trained["qat_accuracy"] is not None else trained["student_accuracy"]
    gates: list[dict[str, Any]] = [{
        "gate": "original test split", "before": before, "after": new_acc,
        "lost_pt": round((before - new_acc) * 100, 2), "max_pt": cfg.refresh.max_regression_pt,
        "ok": (before - new_acc) * 100 <= cfg.refresh.max_regression_pt + 1e-9,
        # how sure the loss is, from the same inputs scored by both models (the rule above is the point estimate)
        "paired": paired_difference(parent_correct, _shipped_correct(RunDir(out), ctx.test)),
    }]
    built: dict[str, Any] = {}
    for target, precision in _production_targets(parent, targets):
        name = f"{target}-{precision}"
        dest = out / "bundles" / name
        try:
            build_bundle(run_dir=out, target=target, precision=precision, out=dest, cfg=cfg.build,
                         signing_key=signing_key)
        except EdgeError as e:  # e.g. the new int8 artifact fails its accuracy gate: this refresh cannot ship there
            gates.append({"gate": f"build {name}", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        old = parent / "bundles" / name
        after = bundle_accuracy(dest, rs.x_val, rs.y_val)
        if (old / "manifest.json").is_file():
            before_b, versus = bundle_accuracy(old, rs.x_val, rs.y_val), f"parent bundle {name}"
        else:  # the parent never built this target: its shipped PyTorch model stands in
            before_b = float(_shipped_correct(prun, (spec.preprocess(rs.x_val), rs.y_val)).mean())
            versus = "parent model (PyTorch)"
        gates.append({"gate": f"held-out collected samples, {name}", "versus": versus, "before": before_b,
                      "after": after, "ok": after > before_b})
        built[name] = str(dest)
    ok = all(g["ok"] for g in gates)
    report = {
        "command": "refresh", "run_dir": str(out), "parent": str(parent.resolve()), "source": source,
        "device": device, "samples": {"pulled": len(samples), "duplicates": rs.duplicates,
                                      "human_labels": rs.human_labels, "train": len(rs.ids_train),
                                      "train_after_balance": int(len(rs.y_train)),
                                      "balance": cfg.refresh.balance.value,
                                      "holdout": len(rs.ids_holdout),
                                      "ids_train": rs.ids_train, "ids_holdout": rs.ids_holdout, "sha256": rs.sha256},
        "stages": trained["stages"], "candidates_test_accuracy": trained["candidates_test_accuracy"],
        "strategy": trained["strategy"], "gate": trained["gate"],
        "gates": gates, "passed": ok, "forced": force and not ok,
        "bundles": built if ok or force else {}, "seconds": round(time.perf_counter() - t0, 1),
    }
    if not ok and not force:
        shutil.rmtree(out / "bundles", ignore_errors=True)
    RunDir(out).write_report("refresh", report)
    if show:
        print_refresh(report)
    if not ok and not force:
        failed = "; ".join(f"{g['gate']}: {g['error']}" if "error" in g else
                           f"{g['gate']}: {g['before']:.4f} -> {g['after']:.4f}{_paired_words(g.get('paired'))}"
                           for g in gates if not g["ok"])
        raise RefreshError(f"refresh gates failed ({failed}); no bundles written (report: "
                           f"{out / 'reports' / 'refresh.json'}; --force keeps them)")
    return report


def _shipped_correct(run: Any, data: tuple[Any, Any]) -> np.ndarray:
    """Per input of ``(x normalised, y)``: did the run's shipped model (QAT program, else fp32 student) get it right."""
    import torch

    from toolchain import engine
    from toolchain.rundir import RunDir

    model = run.load_student_qat() if (run.path / RunDir.STUDENT_QAT).is_file() else run.load_student()
    x, y = (torch.as_tensor(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in data)
    return (engine.predict(model, x).argmax(1) == y).numpy()


def _paired_words(pr: dict[str, Any] | None) -> str:
    if not pr:
        return ""
    lo, hi = pr["lost_pt_ci95"]
    return (f" ({pr['lost_pt']:.2f} pt lost, 95% interval {lo:+.2f} to {hi:+.2f}: {pr['lost']} of {pr['inputs']} "
            f"inputs lost, {pr['gained']} gained, McNemar p = {pr['mcnemar_p']:.3g})")


def paired_difference(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """How much accuracy two models differ by on the same inputs, and how sure that is.

    ``before``/``after``: per input, right or wrong. Only the inputs where they disagree carry information:
    ``lost`` (right before, wrong after) and ``gained``. Reports the points lost with a 95% interval (Wald, on
    the paired difference) and McNemar's exact two-sided p-value (a binomial test of lost vs gained).
    """
    b = np.asarray(before, bool)
    a = np.asarray(after, bool)
    if b.shape != a.shape or b.ndim != 1 or not len(b):
        raise ValueError(f"paired results must be two equal, non-empty 1-D arrays, got {b.shape} and {a.shape}")
    n, lost, gained = len(b), int((b & ~a).sum()), int((~b & a).sum())
    d = (lost - gained) / n
    se = math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    k, m = min(lost, gained), lost + gained
    if m > 2000:  # the normal approximation, with continuity correction: exact sums of big binomials are slow
        p = min(1.0, math.erfc((abs(lost - gained) - 1) / math.sqrt(m) / math.sqrt(2)))
    else:
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"inputs": n, "lost": lost, "gained": gained, "lost_pt": round(100 * d, 2),
            "lost_pt_ci95": [round(100 * (d - 1.96 * se), 2), round(100 * (d + 1.96 * se), 2)],
            "mcnemar_p": round(p, 4)}


def print_refresh(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["samples"]
    t = Table(title=f"refresh gates ({s['train']} collected samples trained on, {s['holdout']} held out, "
                    f"{s['human_labels']} labelled by a person, {s['duplicates']} duplicates dropped)")
    for col in ("gate", "before", "after", "ok"):
        t.add_column(col, justify="left" if col == "gate" else "right")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    for g in report["gates"]:
        t.add_row(g["gate"], pct(g.get("before")), pct(g.get("after")), "[green]pass[/]" if g["ok"] else "[red]FAIL[/]")
    con = Console(stderr=True)
    con.print(t)
    for g in report["gates"]:
        if "error" in g:
            con.print(f"{g['gate']}: {g['error']}", highlight=False)
        if g.get("paired"):
            con.print(f"{g['gate']}:{_paired_words(g['paired'])}", highlight=False)
    gate = report.get("gate")
    if gate:
        share = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        con.print(f"strategy expert: the student is kept; the gate ({gate['params']} parameters) sends "
                  f"{share(gate['original_val_to_student'])} of the original validation inputs to it and "
                  f"{share(gate['held_out_to_expert'])} of the held-out collected ones to the expert "
                  f"(expert alone: {gate['expert_test_accuracy']:.2%} on the original test split)", highlight=False)
        grow = gate.get("growth")
        if grow:
            con.print(f"parameters {grow['params_before']:,} → {grow['params_after']:,}, MACs per input "
                      f"{grow['macs_before']:,} → {grow['macs_after']:,} "
                      f"(strategy \"continue\" keeps the size and forgets more)", highlight=False)
