"""``toolchain inspect BUNDLE``: check a bundle's hashes and print its manifest readably."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json, escape


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="verify a bundle's hashes and show its manifest",
                              description="Open a bundle (directory or .tar.gz), check every file's hash and print "
                              "what it holds: model, target, input spec, metrics, routing, calibration, lineage.")
    p.add_argument("bundle", type=Path, help="bundle directory or .tar.gz")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from edgecore.bundle import open_bundle

    # a tarball is unpacked into a temporary folder, removed afterwards; the output names what the user gave
    with tempfile.TemporaryDirectory(prefix="inspect-") as tmp:
        b = open_bundle(args.bundle, extract_to=Path(tmp) if args.bundle.is_file() else None)
        if args.json:
            emit_json({"bundle": str(args.bundle), "manifest_sha256": b.manifest_sha256, "manifest": b.manifest.to_dict()})
        else:
            render(args.bundle, b.manifest.to_dict(), b.manifest_sha256)
    return 0


def _kv_table(title: str, rows: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            import json

            v = json.dumps(v)
            v = v if len(v) < 110 else v[:107] + "..."
        t.add_row(k, "-" if v is None else escape(v))
    return t


def render(root: Path, m: dict[str, Any], sha: str) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=150)
    c.print(_kv_table(f"bundle {escape(root)}", {
        "model": f"{m['model']['name']} {m['model'].get('version')}", "target": m["target"], "precision": m["precision"],
        "schema": m["schema_version"], "toolchain": m.get("toolchain_version"), "created": m.get("created"),
        "manifest sha256": sha, "artifact": m["artifact"]["main"],
        "runtime": f"{m['artifact']['runtime']} {m['artifact'].get('runtime_version') or ''}",
        "method": (m["artifact"].get("details") or {}).get("method"),
    }))
    inp = m["input"]
    c.print(_kv_table("input / output", {"input": f"{inp['name']} {inp['shape']} {inp['dtype']} {inp['layout']}",
                                          "preprocess": inp.get("preprocess"), "labels": m["output"]["labels"]}))
    c.print(_kv_table("metrics (test split)", m.get("metrics") or {}))
    c.print(_kv_table("routing", {k: v for k, v in (m.get("routing") or {}).items()}))
    c.print(_kv_table("calibration", m.get("calibration") or {"calibration": "none (not int8)"}))
    c.print(_kv_table("lineage", m.get("lineage") or {}))
    files = Table(title="files (hashes verified)", title_justify="left")
    files.add_column("name")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, e in m["files"].items():
        files.add_row(escape(name), str(e["size"]), e["sha256"][:16] + "…")
    c.print(files)
