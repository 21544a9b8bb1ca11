"""Consistent, patient distillation (issue 36): the teacher answers on the student's view, mixing, caching, and a
scratch control on the same view and optimisation steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecore.errors import ConfigError
from toolchain.config import load_config
from toolchain.engine import FitOptions, steps_per_epoch
from toolchain.passes.base import PassContext
from toolchain.passes.distill import DistillPass
from toolchain.tasks import get_train_task
from toolchain.tasks.classify import hard_loss, mix_batch

SHAPE = (1, 8, 8)


#: every input each spy was called on, by tag (a deep copy of a spy logs under the same tag)
LOG: dict[str, list[torch.Tensor]] = {}


class Spy(torch.nn.Module):
    """A tiny classifier that logs every input it is called on under ``tag``."""

    def __init__(self, seed: int, tag: str) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        self.tag = tag
        LOG[tag] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        LOG[self.tag].append(x.detach().clone())
        return self.net(x)


def _ctx(*overrides: str, n: int = 48) -> PassContext:
    torch.manual_seed(0)
    x, y = torch.randn(n, *SHAPE), torch.randint(0, 3, (n,))
    cfg = load_config(None, overrides=["train.progress=false", "data.batch_size=16", *overrides])
    return PassContext(cfg=cfg, teacher=Spy(1, "teacher"), train=(x, y), val=(x[:8], y[:8]), test=(x[:8], y[:8]),
                       input_shape=SHAPE, num_classes=3, augment=True)


def _batches(tag: str) -> list[torch.Tensor]:
    """A spy's training batches (16 rows; the validation split, which the metric runs on, has 8)."""
    return [x for x in LOG[tag] if len(x) == 16]


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "none"])
def test_the_teacher_answers_on_exactly_the_students_augmented_and_mixed_view(mix):
    ctx = _ctx("distill.epochs=2", "distill.shift=2", "distill.flip=true", f"distill.mix=\"{mix}\"")
    out, _ = DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    student, teacher = _batches("student"), _batches("teacher")
    assert len(student) == len(teacher) == 6  # 2 epochs x 3 steps
    for s, t in zip(student, teacher):
        assert torch.equal(s, t)
    # and the view was augmented: no batch is a slice of the training inputs as they are
    assert not any(torch.equal(b, ctx.train[0][i:i + 16]) for b in student for i in range(0, 48, 16))
    view = out.summary["recipe"]["view"]
    assert view["shift"] == 2 and view["flip"] and view["mix"] == mix and not view["deterministic"]
    assert out.summary["recipe"]["teacher_sees"] == "the student's view"


def test_the_view_check_fails_when_the_teacher_answers_on_the_clean_input(monkeypatch):
    """The sibling: a distillation loss that shows the teacher the un-augmented input is caught by the same check."""
    task = get_train_task()
    clean: dict[str, torch.Tensor] = {}
    augment = type(task).augment

    def remember(self, xb, yb, opts):
        clean["x"] = xb
        return augment(self, xb, yb, opts)

    def inconsistent(self, teacher, *, temperature, alpha, label_smoothing=0.0):
        def fn(model, xb, yb):
            with torch.no_grad():
                t = teacher(clean["x"])
            return hard_loss(model(xb), yb) + 0 * t.sum()
        return fn

    monkeypatch.setattr(type(task), "augment", remember)
    monkeypatch.setattr(type(task), "distill_loss", inconsistent)
    ctx = _ctx("distill.epochs=1", "distill.shift=2", "distill.mix=\"mixup\"")
    DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    student, teacher = _batches("student"), _batches("teacher")
    assert len(student) == len(teacher) == 3
    assert not any(torch.equal(s, t) for s, t in zip(student, teacher))


def test_mixup_blends_pairs_and_the_labels_follow():
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    xm, rows = mix_batch(x, y, "mixup", 1.0)
    lam = float(rows[0, 2])
    assert 0 < lam < 1 and torch.all(rows[:, 2] == lam) and torch.equal(rows[:, 0].long(), y)
    for i in range(6):  # each row is lam * its own input + (1 - lam) * its partner's, the partner's label beside
        j = int(torch.nonzero(y == rows[i, 1].long()).flatten()[0])
        partners = [k for k in range(6) if y[k] == rows[i, 1].long()
                    and torch.allclose(xm[i], lam * x[i] + (1 - lam) * x[k], atol=1e-6)]
        assert partners, (i, j)
    logits = torch.randn(6, 3)
    want = (lam * F.cross_entropy(logits, y, reduction="none")
            + (1 - lam) * F.cross_entropy(logits, rows[:, 1].long(), reduction="none")).mean()
    assert torch.allclose(hard_loss(logits, rows), want)
    # the sibling: the mixed rows are not read as if the first label were the only one
    assert not torch.allclose(hard_loss(logits, rows), F.cross_entropy(logits, y))


def test_cutmix_pastes_a_segment_of_the_partner_and_weighs_the_labels_by_what_is_kept():
    torch.manual_seed(3)
    x, y = torch.arange(8 * 40, dtype=torch.float32).reshape(8, 1, 1, 40), torch.arange(8)
    xm, rows = mix_batch(x, y, "cutmix", 1.0)
    lam = float(rows[0, 2])
    assert 0 < lam < 1
    for i in range(8):  # labels are the indices: row i's partner is input rows[i, 1]
        j = int(rows[i, 1])
        if j == i:
            continue
        kept, pasted = xm[i] == x[i], xm[i] == x[j]
        assert bool((kept | pasted).all()) and float(kept.float().mean()) == pytest.approx(lam)
        cut = torch.nonzero(pasted.flatten()).flatten()  # one contiguous segment along the signal
        assert len(cut) and int(cut[-1] - cut[0]) + 1 == len(cut)


def test_a_deterministic_view_caches_the_teachers_answers_and_a_random_one_does_not():
    cached = _ctx("distill.epochs=2", "distill.shift=0")
    out, _ = DistillPass(cached.cfg).run(Spy(2, "student"), cached)
    assert out.summary["recipe"]["teacher_sees"] == "the student's view, answers cached"
    assert out.summary["recipe"]["view"]["deterministic"]
    assert [len(x) for x in LOG["teacher"]] == [48]  # once, on the whole training split
    fresh = _ctx("distill.epochs=2", "distill.shift=1")
    out, _ = DistillPass(fresh.cfg).run(Spy(2, "student"), fresh)
    assert out.summary["recipe"]["teacher_sees"] == "the student's view"
    assert [len(x) for x in LOG["teacher"]] == [16] * 6  # every step
    off = _ctx("distill.epochs=2", "distill.shift=0", "distill.cache_teacher=false")
    DistillPass(off.cfg).run(Spy(2, "student"), off)
    assert [len(x) for x in LOG["teacher"]] == [16] * 6
    # the cached loss is the same loss: the same value on the same batch
    task = get_train_task()
    teacher, model = Spy(1, "t").eval(), Spy(2, "s")
    x, y = cached.train
    targets, loss = task.cached_distill_loss(teacher, x, y, temperature=4.0, alpha=0.7)
    plain = task.distill_loss(teacher, temperature=4.0, alpha=0.7)
    assert torch.allclose(loss(model, x[:16], targets[:16]), plain(model, x[:16], y[:16]), atol=1e-5)
    assert not torch.allclose(loss(model, x[:16], targets[16:32]), plain(model, x[:16], y[:16]), atol=1e-5)
    assert steps_per_epoch(48, FitOptions(epochs=1, lr=1, batch_size=16)) == 3
    assert steps_per_epoch(50, FitOptions(epochs=1, lr=1, batch_size=16)) == 3  # the short last batch is dropped


def test_patience_zero_runs_the_whole_schedule_and_bad_options_are_refused(monkeypatch):
    from toolchain import engine

    got = {}
    real = engine.fit

    def spy(model, **kw):
        got["opts"] = kw["opts"]
        return real(model, **kw)

    monkeypatch.setattr(engine, "fit", spy)
    ctx = _ctx("distill.epochs=1", "distill.patience=0", "distill.mix=\"mixup\"", "distill.mix_alpha=0.4")
    out, _ = DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    assert got["opts"].patience is None and got["opts"].mix == "mixup" and got["opts"].mix_alpha == 0.4
    assert out.summary["recipe"]["early_stopping"] == "none (the whole schedule)"
    assert out.summary["steps"] == out.summary["steps_run"] == 3
    ctx = _ctx("distill.epochs=1", "distill.patience=5")
    DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    assert got["opts"].patience == 5 and got["opts"].mix == "none"
    for bad, match in (("distill.mix=\"blend\"", r"distill\.mix: must be one of none, mixup, cutmix"),
                       ("distill.patience=-1", r"distill\.patience: must be >= 0"),
                       ("distill.mix_alpha=0", r"distill\.mix_alpha: must be > 0"),
                       ("distill.shift=-1", r"distill\.shift")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides=[bad])


def test_the_scratch_control_trains_on_distillations_view_for_the_same_steps(monkeypatch):
    from toolchain import engine
    from toolchain.passes import control

    got = {}

    def fake_fit(model, **kw):
        got.update(kw)
        return engine.FitState(epoch=kw["opts"].epochs)

    monkeypatch.setattr(engine, "fit", fake_fit)
    ctx = _ctx("distill.epochs=5", "distill.shift=2", "distill.mix=\"cutmix\"", "distill.flip=true",
               "prune.steps=2", "prune.finetune_epochs=1")
    sections = {"prune": {"pruned": True, "steps": 2}, "distill": {"steps": 15, "steps_run": 12}}
    budget = control.epoch_budget(sections, ctx.cfg)
    c = control.scratch_control(Spy(3, "control"), ctx, budget=budget, student_accuracy=0.5, sections=sections)
    opts = got["opts"]
    assert budget == 7 and opts.epochs == 7 and opts.patience is None
    assert (opts.shift, opts.flip, opts.mix) == (2, True, "cutmix")
    assert c["compressed_steps"] == {"prune": 6, "distill": 15, "total": 21, "total_run": 18}
    assert c["steps"] == c["steps_run"] == 21 == c["compressed_steps"]["total"]
    assert c["view"]["mix"] == "cutmix"
    line = control.matching_line(c)
    assert line == ("compute-matched: the control ran 21 optimisation steps, compression 18 of 21 (prune 6 + "
                    "distill 15); same view: shifts ≤ 2, flips, cutmix")
    # without a distillation pass the control keeps the plain training view
    c = control.scratch_control(Spy(3, "control"), ctx, budget=2, student_accuracy=0.5, sections={"prune": {"pruned": True}})
    assert got["opts"].mix == "none" and got["opts"].shift == 1 and c["compressed_steps"]["distill"] == 0


def test_what_a_task_does_not_apply_is_reported_not_claimed(monkeypatch):
    """Detection flips frames with their boxes but does not shift or mix them: its view and the report say so."""
    from toolchain.tasks.detect import DetectTraining

    opts = FitOptions(epochs=1, lr=1, augment=True, shift=3, mix="mixup")
    view = DetectTraining.view(None, opts)  # type: ignore[arg-type]
    assert view["flip"] and view["shift"] == 0 and view["mix"] == "none" and not view["deterministic"]
    ctx = _ctx("distill.epochs=1", "distill.shift=2", "distill.mix=\"cutmix\"")
    out, _ = DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    assert out.summary["recipe"]["not_applied"] == []
    real = type(ctx.train_task).view
    monkeypatch.setattr(type(ctx.train_task), "view", lambda self, o: {**real(self, o), "mix": "none"})  # cannot mix
    out, _ = DistillPass(ctx.cfg).run(Spy(2, "student"), ctx)
    assert out.summary["recipe"]["not_applied"] == ["mix"]


def test_several_control_seeds_give_the_gain_over_their_median_and_its_spread(monkeypatch):
    from toolchain import engine
    from toolchain.passes import control

    seeds_seen = []
    monkeypatch.setattr(engine, "fit", lambda model, **kw: (seeds_seen.append(kw["opts"].seed),
                                                            engine.FitState(epoch=kw["opts"].epochs))[1])
    accuracies = iter([0.90, 0.70, 0.80])
    monkeypatch.setattr(control, "stage_row", lambda stage, model, ctx, **kw: {"stage": stage,
                                                                               "test_accuracy": next(accuracies)})
    ctx = _ctx("compress.control_seeds=3")
    c = control.scratch_control(Spy(3, "control"), ctx, budget=2, student_accuracy=0.85, sections={})
    assert len(set(seeds_seen)) == 3  # three different seeds
    assert c["seeds"] == 3 and c["test_accuracies"] == [0.90, 0.70, 0.80] and c["test_accuracy"] == 0.80
    assert c["gains_pt"] == [-5.0, 15.0, 5.0] and c["gain_pt"] == 5.0 and c["gain_spread_pt"] == [-5.0, 15.0]
    assert c["verdict"].startswith("compression bought +5.00 pt") and "median of 3 seeds" in c["row"]["stage"]
    assert control.matching_line(c).endswith("; over 3 control seeds the gain ranges -5.00..+15.00 pt")
    # one seed (the default): no spread claimed
    accuracies = iter([0.90])
    c = control.scratch_control(Spy(3, "control"), _ctx(), budget=2, student_accuracy=0.85, sections={})
    assert c["seeds"] == 1 and c["gain_pt"] == -5.0 and "over" not in control.matching_line(c).split("view")[1]
    with pytest.raises(ConfigError, match=r"compress\.control_seeds: must be in \[1, 10\]"):
        load_config(None, overrides=["compress.control_seeds=0"])
