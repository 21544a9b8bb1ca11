"""Terminal tables (rich) for run and fleet results."""

from __future__ import annotations

from typing import Any


def console() -> Any:
    """The terminal's width on a TTY; wide in pipes and logs, where rich would cut tables to 80 columns."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=200)


def print_rows(run: dict[str, Any]) -> None:
    from rich.table import Table

    from .report import post_cell, post_name, speedup_text

    post = post_name(run["results"])  # a detector's decode+NMS: p50 ms and share of the frame
    t = Table(title="hw-bench results")
    cols = ["artifact", "device", "scenario", "p50 ms", "p99 ms"] + ([f"{post} ms (share)"] if post else []) + \
        ["throughput/s", "vs PyTorch", "accuracy"]
    for col in cols:
        t.add_column(col, justify="right" if col not in ("artifact", "device", "scenario") else "left")
    for r in run["results"]:
        acc = r.get("accuracy")
        acc = acc.get("accuracy") if isinstance(acc, dict) else acc
        t.add_row(str(r["artifact"]), str(r.get("device_id") or ""), str(r.get("scenario")),
                  f"{r['latency_ms']['p50']:.3g}", f"{r['latency_ms']['p99']:.3g}", *([post_cell(r)] if post else []),
                  f"{r['throughput_sps']:.4g}", speedup_text(r), f"{acc:.4f}" if acc is not None else "–")
    con = console()
    con.print(t)
    for d in run.get("devices", []):
        if not d.get("ok"):
            con.print(f"[red]{d['device_id']}: {d.get('error')}[/red]")
    for c in run.get("cross_checks", []):
        if c.get("available"):
            con.print(f"{c['artifact']}: ours p50 {c['ours_median_ms']:.4g} ms vs {c['tool']} median "
                      f"{c['median_ms']:.4g} ms (ratio {c['latency_ratio']:.3f}); throughput ratio {c['throughput_ratio']:.3f}")
        else:
            con.print(f"{c['artifact']}: {c['tool']} absent: {c.get('reason')}")
    from rich.markup import escape

    from .report import build_accuracy_cell

    for n in run.get("not_run", []):
        con.print(f"[yellow]not run here[/yellow] {escape(n['artifact'])}: build accuracy {escape(build_accuracy_cell(n))}; "
                  f"{escape(n['reason'])}", highlight=False)
    for n in run.get("notes", []):
        con.print(f"note: {n}")
