"""Where compression's gain over training small from scratch comes from (issue 36): an ablation per data set and seed.

    python docs/acceptance/distill_ablation.py --out /tmp/kd-ablation --sources mnist1d digits --seeds 0 1 2

Per data set and seed (``run.seed``: split and initialisation): the default teacher (``toolchain train``), pruned
once at the default ratio (``prune``: 10x fewer MACs, 4 steps x 2 fine-tuning epochs, shared by every row that
prunes), then, each row on the same split, the same pruned architecture and the same optimisation steps
(8 fine-tuning epochs + the distillation epochs of its schedule):

- *today*: prune + distill as configured before issue 36 (1-pixel shifts, 20 epochs, early stopping after 8),
  and its scratch control (the same view and steps, from re-initialised weights, labels only);
- *consistent* (the ``--shift/--flip/--mix/--epochs`` recipe, no early stopping):
  prune + distill; prune only (the same passes with ``distill.alpha = 0``: labels only); distill only (the pruned
  architecture re-initialised, distilled for every step); prune + distill *inconsistent* (the same view for the
  student, the teacher answering on the clean, un-augmented, un-mixed input); and the scratch control.

One PyTorch thread. Prints Markdown tables (per seed, then medians with min..max) and writes ``OUT/results.json``
(after every row); ``--report OUT/results.json`` prints the tables again from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

TODAY = {"epochs": 20, "patience": 8, "shift": 1, "flip": False, "mix": "none"}


def _cfg(source: str, seed: int, run_dir: Path) -> Any:
    from toolchain.config import from_dict

    return from_dict({"data": {"source": source}, "run": {"seed": seed, "dir": str(run_dir)},
                      "train": {"progress": False}, "compress": {"passes": ["prune", "distill"]}},
                     origin="distill_ablation")


def _with_distill(ctx: Any, **distill: Any) -> Any:
    cfg = ctx.cfg.replace(distill=dataclasses.replace(ctx.cfg.distill, **distill))
    return dataclasses.replace(ctx, cfg=cfg)


def _distill(ctx: Any, student: Any) -> tuple[Any, dict[str, Any], float]:
    from toolchain.passes import get_pass

    out, seconds = get_pass("distill")(ctx.cfg).run(student, ctx)
    return out.model, out.summary, seconds


def _inconsistent(ctx: Any, student: Any) -> tuple[Any, dict[str, Any], float]:
    """Distillation whose teacher answers on the clean input while the student sees the augmented, mixed view."""
    import copy

    import torch

    from toolchain import engine
    from toolchain.tasks.classify import kd_loss

    d, task, teacher = ctx.cfg.distill, ctx.train_task, ctx.teacher.eval()
    clean: dict[str, Any] = {}

    def augment(xb: Any, yb: Any, opts: Any) -> Any:
        clean["x"] = xb
        return task.augment(xb, yb, opts)

    def loss(model: Any, xb: Any, yb: Any) -> Any:
        with torch.no_grad():
            t_logits = teacher(clean["x"])
        return kd_loss(model(xb), t_logits, yb, temperature=d.temperature, alpha=d.alpha,
                       label_smoothing=ctx.cfg.train.label_smoothing)

    model = copy.deepcopy(student)
    opts = ctx.fit_options(epochs=d.epochs, lr=d.lr, desc="distill (inconsistent)", seed_offset=100, warmup_epochs=0,
                           patience=d.patience or None, **d.view_options())
    t0 = time.perf_counter()
    state = engine.fit(model, loss_fn=loss, metric=task.model_metric, augment=augment, train=ctx.train, val=ctx.val,
                       opts=opts)
    return model.cpu().eval(), {"epochs_run": state.epoch}, time.perf_counter() - t0


def one(source: str, seed: int, out: Path, recipe: dict[str, Any], *, rows_wanted: str = "all",
        on_row: Any = None) -> dict[str, Any]:
    """One data set and seed: ``rows_wanted`` "goal" (today's and the consistent recipe's prune + distill and
    their controls), "ablation" (prune only, distill only, the inconsistent teacher) or "all"."""
    import torch

    from toolchain.compress import make_context, make_student
    from toolchain.passes import get_pass
    from toolchain.passes.control import scratch_control
    from toolchain.rundir import RunDir
    from toolchain.train import train

    torch.set_num_threads(1)
    run_dir = out / f"{source}-s{seed}"
    cfg = _cfg(source, seed, run_dir)
    t0 = time.perf_counter()
    if not (run_dir / RunDir.TEACHER).is_file():
        train(cfg, run_dir)
    teacher_s = time.perf_counter() - t0
    base = make_context(cfg, RunDir(run_dir))
    teacher_acc = base.metric(base.teacher, base.test)
    prune_out, prune_s = get_pass("prune")(base.cfg).run(make_student(base.cfg, base), base)
    pruned, prune_sec = prune_out.model, prune_out.summary
    ft_epochs = base.cfg.prune.steps * base.cfg.prune.finetune_epochs
    rows: list[dict[str, Any]] = []

    def add(name: str, model: Any, seconds: float, *, epochs: int, summary: dict[str, Any] | None = None) -> None:
        acc = base.metric(model, base.test)
        rows.append({"row": name, "test_accuracy": acc, "seconds": round(seconds, 1), "epochs": epochs,
                     "epochs_run": (summary or {}).get("epochs_run"), "load": round(os.getloadavg()[0], 2)})
        print(f"{source} seed {seed}: {name}: {acc:.2%} ({seconds:.0f} s)", flush=True)

    def control(ctx: Any, name: str, student_acc: float) -> None:
        epochs = ft_epochs + ctx.cfg.distill.epochs
        t = time.perf_counter()
        c = scratch_control(pruned, ctx, budget=epochs, student_accuracy=student_acc,
                            sections={"prune": prune_sec, "distill": {}})
        rows.append({"row": name, "test_accuracy": c["test_accuracy"], "seconds": round(time.perf_counter() - t, 1),
                     "epochs": epochs, "epochs_run": c["epochs_run"], "steps": c["steps"],
                     "load": round(os.getloadavg()[0], 2)})
        print(f"{source} seed {seed}: {name}: {c['test_accuracy']:.2%}", flush=True)

    result = _result(source, seed, 0.0, teacher_s, prune_sec, prune_s, recipe, rows)
    result["teacher_accuracy"] = teacher_acc
    on_row = on_row or (lambda r: None)
    new = _with_distill(base, **recipe)
    if rows_wanted in ("goal", "all"):
        _goal(base, new, pruned, prune_sec, ft_epochs, add, control, recipe, on_row, result)
    if rows_wanted in ("ablation", "all"):
        _ablation(new, pruned, ft_epochs, add, recipe, seed, on_row, result)
    return result


def _goal(base: Any, new: Any, pruned: Any, prune_sec: Any, ft_epochs: int, add: Any, control: Any,
          recipe: dict[str, Any], on_row: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    today = _with_distill(base, **TODAY)
    model, summary, s = _distill(today, pruned)
    add("today: prune + distill", model, s, epochs=ft_epochs + TODAY["epochs"], summary=summary)
    control(today, "today: scratch control", rows[-1]["test_accuracy"])

    on_row(result)
    model, summary, s = _distill(new, pruned)
    add("consistent: prune + distill", model, s, epochs=ft_epochs + recipe["epochs"], summary=summary)
    control(new, "consistent: scratch control", rows[-1]["test_accuracy"])
    on_row(result)


def _ablation(new: Any, pruned: Any, ft_epochs: int, add: Any, recipe: dict[str, Any], seed: int, on_row: Any,
              result: dict[str, Any]) -> None:
    from toolchain.passes.control import reinitialise

    model, summary, s = _distill(_with_distill(new, alpha=0.0), pruned)
    add("consistent: prune only (labels, alpha 0)", model, s, epochs=ft_epochs + recipe["epochs"], summary=summary)
    on_row(result)
    model, summary, s = _distill(_with_distill(new, epochs=ft_epochs + recipe["epochs"]), reinitialise(pruned, seed + 500))
    add("consistent: distill only (re-initialised)", model, s, epochs=ft_epochs + recipe["epochs"], summary=summary)
    on_row(result)
    model, summary, s = _inconsistent(new, pruned)
    add("consistent: prune + distill, teacher on the clean input", model, s, epochs=ft_epochs + recipe["epochs"],
        summary=summary)
    on_row(result)


def _result(source: str, seed: int, teacher_acc: float, teacher_s: float, prune_sec: dict[str, Any], prune_s: float,
            recipe: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"source": source, "seed": seed, "teacher_accuracy": teacher_acc, "teacher_seconds": round(teacher_s, 1),
            "prune": {k: prune_sec[k] for k in ("macs_reduction", "params_reduction", "channel_ratio")},
            "prune_seconds": round(prune_s, 1), "recipe": recipe, "rows": rows}


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: one row per data set and seed, then the medians (min..max) over seeds, per data set."""
    names = list(dict.fromkeys(row["row"] for r in results for row in r["rows"]))
    gains = (("today", "today: prune + distill", "today: scratch control"),
             ("consistent", "consistent: prune + distill", "consistent: scratch control"),
             # the consistent student against the other control: light view (no mixing), 10 epochs fewer
             ("consistent vs today's control", "consistent: prune + distill", "today: scratch control"))

    def gain(r: dict[str, Any], a: str, b: str) -> float | None:
        x, y = acc(r, a), acc(r, b)
        return None if x is None or y is None else x - y

    def acc(r: dict[str, Any], name: str) -> float | None:
        found = [row["test_accuracy"] * 100 for row in r["rows"] if row["row"] == name]
        return found[0] if found else None

    def med(xs: list[float], sign: bool = False) -> str:
        if not xs:
            return "–"
        f = "{:+.2f}" if sign else "{:.2f}"
        return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}..{f.format(max(xs))})"

    head = ("| source | seed | teacher | " + " | ".join(names) + " | "
            + " | ".join(f"{g}: compressed − scratch (pt)" if " vs " not in g else f"{g} (pt)" for g, _, _ in gains)
            + " |")
    lines = [f"CPU: {meta['cpu']}; load average {meta['load_start']:.1f} at the start, "
             f"{meta.get('load_end', 0):.1f} at the end (per row in results.json); one PyTorch thread. "
             f"Consistent recipe: {json.dumps(results[0]['recipe'])}", "", head,
             "|---" * (len(names) + 3 + len(gains)) + "|"]
    for r in results:
        cells = [f"{a:.2f}" if (a := acc(r, n)) is not None else "–" for n in names]
        lines.append(f"| {r['source']} | {r['seed']} | {r['teacher_accuracy'] * 100:.2f} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{g:+.2f}" if (g := gain(r, a, b)) is not None else "–" for _, a, b in gains)
                     + " |")
    lines += ["", "Medians over seeds (min..max), test accuracy in %, gains in points:", "",
              head.replace("| seed | teacher |", "| seeds | teacher |"), lines[3]]
    for source in dict.fromkeys(r["source"] for r in results):
        rs = [r for r in results if r["source"] == source]
        cells = [med([a for r in rs if (a := acc(r, n)) is not None]) for n in names]
        lines.append(f"| {source} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{med([r['teacher_accuracy'] * 100 for r in rs])} | " + " | ".join(cells) + " | "
                     + " | ".join(med([g for r in rs if (g := gain(r, a, b)) is not None], True) for _, a, b in gains)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/kd-ablation"))
    ap.add_argument("--sources", nargs="+", default=["mnist1d", "digits"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--plan", nargs="*", default=None, metavar="SOURCE:SEED:ROWS",
                    help="run these units in this order instead (ROWS: goal | ablation | all), e.g. mnist1d:0:goal "
                         "digits:0:all; rows of the same source and seed are reported together")
    ap.add_argument("--epochs", type=int, default=30, help="consistent recipe: distillation epochs (no early stop)")
    ap.add_argument("--shift", type=int, default=2)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--mix", default="mixup", choices=["none", "mixup", "cutmix"])
    ap.add_argument("--mix-alpha", type=float, default=1.0)
    ap.add_argument("--report", type=Path, default=None, help="only print the tables of this results.json")
    a = ap.parse_args()
    if a.report is not None:
        saved = json.loads(a.report.read_text())
        print(report(_merge(saved["results"]), saved["meta"]))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    recipe = {"epochs": a.epochs, "patience": 0, "shift": a.shift, "flip": a.flip, "mix": a.mix,
              "mix_alpha": a.mix_alpha}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    meta: dict[str, Any] = {"cpu": cpu, "load_start": os.getloadavg()[0], "torch_threads": 1}
    path = a.out / "results.json"
    plan = [p.split(":") for p in a.plan] if a.plan else [[src, str(sd), "all"] for src in a.sources for sd in a.seeds]
    results: list[dict[str, Any]] = []

    def save(_: Any = None) -> None:
        meta["load_end"] = os.getloadavg()[0]
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    for source, seed, rows_wanted in plan:
        r = one(source, int(seed), a.out, recipe, rows_wanted=rows_wanted,
                on_row=lambda part: save(results.append(part) if part not in results else None))
        if r not in results:
            results.append(r)
        save()
    print(report(_merge(results), meta))


def _merge(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A source and seed run in two units (goal, then ablation): one row of the table."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        key = (r["source"], r["seed"])
        if key in merged:
            merged[key]["rows"] += r["rows"]
        else:
            merged[key] = {**r, "rows": list(r["rows"])}
    return list(merged.values())


if __name__ == "__main__":
    main()
