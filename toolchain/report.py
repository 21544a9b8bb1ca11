"""Readable tables for the pipeline reports (rich), printed by the commands."""

from __future__ import annotations

from typing import Any


def _console() -> Any:
    import shutil

    from rich.console import Console

    # wide enough for the tables in logs and pipes too (rich defaults to 80 there)
    return Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def print_train(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"teacher ({report['teacher']['family']})")
    for col in ("params", "MACs", "size", "epochs", "val acc", "test acc", "seconds"):
        t.add_column(col, justify="right")
    tr = report["teacher"]
    t.add_row(
        human_count(tr["params"]), human_count(tr["macs"]), human_bytes(tr["size_bytes"]),
        f"{report['epochs_run']}{' (early stop)' if report['stopped_early'] else ''}",
        f"{report['val_accuracy']:.2%}", f"{report['test_accuracy']:.2%}", f"{report['seconds']:.1f}",
    )
    _console().print(t)


def print_compress(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"compression passes: {' -> '.join(report.get('passes', []))}")
    for col in ("stage", "params", "MACs", "size on disk", "test acc", "seconds"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    base = report["stages"][0]
    alternatives = report.get("alternatives") or []
    for i, s in enumerate(report["stages"]):
        t.add_row(*_stage_cells(s, base), end_section=bool(alternatives) and i == len(report["stages"]) - 1)
    for alt in alternatives:
        for s in alt["stages"]:
            t.add_row(*_stage_cells(s, base), style="dim")
    _console().print(t)
    quant = report.get(report.get("quantization") or "") or {}
    if quant:
        _console().print(
            f"{report['quantization'].upper()} weights: {report['qdq_weight_bits']}-bit "
            f"({'VNNI' if quant.get('cpu_vnni') else 'no VNNI'} on this CPU, setting {quant.get('weight_bits_setting')!r})"
        )
    else:
        _console().print("no quantizing pass: the student stays fp32 (int8 targets calibrate it themselves)")
    control = report.get("control") or {}
    if control.get("verdict"):
        _console().print(control["verdict"])
        if control.get("compressed_steps"):
            from toolchain.passes.control import matching_line

            _console().print(matching_line(control))
    heads = (report.get("prune") or {}).get("attention") or []
    if heads:
        _console().print("attention heads (before -> after pruning): " + ", ".join(
            f"{a['layer']} {a['heads'][0]}->{a['heads'][1]} x {a['head_dim'][1]}" for a in heads))
    search = (report.get("prune") or {}).get("latency")
    if search:
        print_latency_search(search)


def print_latency_search(s: dict[str, Any]) -> None:
    """Every candidate of the latency-budget search, the chosen one marked."""
    from rich.table import Table

    pct = f"p{s['percentile']:g} ms"
    limit = s.get("limit_ms", s["budget_ms"])
    t = Table(title=f"latency-budget search: {s['latency_target']} on {s['device']}, budget {s['budget_ms']:g} ms "
                    f"({pct}, {s['threads']} threads; candidates must be within {limit:.4g} ms on the fit; "
                    f"{s['rounds']} rounds each against the unpruned reference, {s['reference_ms']:.4f} ms)")
    for col in ("step", "channels removed", "params", "MACs", "p50 ms", pct, "range", "fit", "val acc", "test acc", ""):
        t.add_column(col, justify="right" if col else "left")
    for c in s["candidates"]:
        within = c["fit_ms"] <= limit
        lo, hi = c["pxx_range_ms"]
        t.add_row(str(c["step"]), f"{c['channel_ratio']:.0%}", human_count(c["params"]), human_count(c["macs"]),
                  f"{c['p50_ms']:.4f}", f"{c['pxx_ms']:.4f}", f"{lo:.4f}–{hi:.4f}", f"{c['fit_ms']:.4f}",
                  f"{c['val_accuracy']:.2%}", f"{c['test_accuracy']:.2%}",
                  ("[bold green]chosen[/]" if c["chosen"] else ("within budget" if within else "over budget"))
                  + (" (cached)" if c["cached"] else ""), style=None if within else "dim")
    _console().print(t)
    for r in s["remeasures"]:
        lo, hi = r["range_ms"]
        verdict = "within" if r["within_budget"] else "[bold red]over[/]"
        _console().print(f"re-measured step {r['step']}: {r['pxx_ms']:.4f} ms p{r['percentile']:g} (range {lo:.4f}–{hi:.4f} "
                         f"over {r['rounds']} rounds, reference {r['reference_ms']:.4f} ms; the search had "
                         f"{r['search_ms']:.4f}): {verdict} the budget of {s['budget_ms']:g} ms"
                         + ("" if r["within_budget"] else ", falling back to the next smaller candidate"))
    _console().print(f"{s['built_and_measured']} candidates built and measured, {s['cache_hits']} from the cache, "
                     f"{s['search_seconds']:.1f} s; plot: {s.get('plot', '-')}")


def _stage_cells(s: dict[str, Any], base: dict[str, Any]) -> list[str]:
    return [
        s["stage"],
        f"{human_count(s['params'])} ({base['params'] / max(s['params'], 1):.1f}x)",
        f"{human_count(s['macs'])} ({base['macs'] / max(s['macs'], 1):.1f}x)",
        human_bytes(s["size_bytes"]),
        f"{s['test_accuracy']:.2%}",
        f"{s['seconds']:.1f}",
    ]


def print_export(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="ONNX exports (ONNX Runtime vs PyTorch on the test split)")
    for col in ("file", "size", "ORT test acc", "torch test acc", "agreement", "max |Δlogit|"):
        t.add_column(col, justify="left" if col == "file" else "right")
    for m in report["models"].values():
        t.add_row(
            m["file"], human_bytes(m["size_bytes"]), f"{m['ort_accuracy']:.2%}", f"{m['torch_accuracy']:.2%}",
            f"{m['agreement']:.2%}", f"{m['max_abs_logit_diff']:.2e}",
        )
    _console().print(t)
    _console().print(f"QDQ weights: {report['qdq_weight_bits']}-bit")
