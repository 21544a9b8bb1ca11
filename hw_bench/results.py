"""Result files: one JSON per run, with a schema version; appendable.

A run file is ``{"schema_version": 1, "kind": "hw_bench.results", "created",
"env": {...}, "results": [row, ...], "cross_checks": [...], "notes": [...]}``.
Appending (``--append``) adds rows to an existing file of the same schema,
rewritten atomically. Fleet runs hold one ``devices`` entry per device, each
with its own env and rows. Torch-free.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable

from edgecore.errors import BenchError
from edgecore.fsutil import atomic_write_json

from . import RESULTS_SCHEMA_VERSION

KIND = "hw_bench.results"


def new_run(*, env: dict[str, Any], rows: list[dict[str, Any]], cross_checks: list[dict[str, Any]] | None = None,
            notes: list[str] | None = None, not_run: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run; ``not_run``: bundles this machine could not run, with their build-time figures (`bench.not_run_entry`)."""
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "kind": KIND,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "results": rows,
        "cross_checks": cross_checks or [],
        "notes": notes or [],
        "not_run": not_run or [],
    }


def read_run(path: Path) -> dict[str, Any]:
    """A run file, checked: its schema version and the keys the report needs."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise BenchError(f"{path}: no such results file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{path}: not a readable results file ({e})") from e
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise BenchError(f"{path}: not an hw-bench results file (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("schema_version") != RESULTS_SCHEMA_VERSION:
        raise BenchError(
            f"{path}: results schema {doc.get('schema_version')!r}, this hw-bench reads {RESULTS_SCHEMA_VERSION}"
        )
    if not isinstance(doc.get("results"), list):
        raise BenchError(f"{path}: 'results' is not a list")
    return doc


def write_run(path: Path, run: dict[str, Any], *, append: bool = False) -> Path:
    """Write ``run`` to ``path``; with ``append``, add its rows to the file already there."""
    path = Path(path)
    if append and path.exists():
        old = read_run(path)
        old["results"].extend(run["results"])
        old["cross_checks"] = old.get("cross_checks", []) + run.get("cross_checks", [])
        old["notes"] = old.get("notes", []) + run.get("notes", [])
        old["not_run"] = old.get("not_run", []) + run.get("not_run", [])
        old.setdefault("envs", []).append(run["env"])
        run = old
    atomic_write_json(path, run)
    return path


def rows_with_env(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row of every run, each carrying the env it was measured in (``_env``) and which run it came from
    (``_run``: rows of one run share its interleaved rounds, so their ratios pair round by round)."""
    out = []
    for k, run in enumerate(runs):
        for row in run["results"]:
            out.append({**row, "_env": row.get("env") or run.get("env", {}), "_run": k})
    return out
