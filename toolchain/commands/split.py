"""``toolchain split --run RUN --split test --out test.npz``: one split of a run's data as a ``.npz``.

What a device is fed to check a bundle on data it has never seen (``device-agent feed --source test.npz``,
or ``device-agent feed --run RUN --split test``, which runs this command): ``x`` (raw inputs, batch first, as
``data.json``'s input spec takes them before normalisation), ``y`` (class indices) and ``labels``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgecore.clikit import add_common, add_json_flag, emit_json

SPLITS = ("test", "val", "train", "calibration")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("split", help="write one split of a run's data (x, y, labels) as a .npz",
                              description=__doc__)
    p.add_argument("--run", required=True, type=Path, help="the run directory (its data.json)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split (default: test)")
    p.add_argument("--out", required=True, type=Path, help="the .npz to write")
    add_json_flag(p)
    add_common(p)
    p.set_defaults(func=run)


def write_split(run_dir: Path, split: str, out: Path) -> dict[str, Any]:
    """Reload ``split`` of the run's recorded data (checked against its sha256) and write it to ``out``."""
    import numpy as np

    from edgecore.errors import DataError
    from edgecore.fsutil import atomic_write_bytes
    from toolchain.rundir import RunDir

    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    splits = RunDir(run_dir).splits()
    part = getattr(splits, split)
    if part is None or len(part[0]) == 0:
        raise DataError(f"run {run_dir} has no {split} split (data.calibration_fraction = 0?)")
    x, y = np.asarray(part[0], np.float32), np.asarray(part[1])
    arrays: dict[str, Any] = {"x": x, "labels": np.asarray(list(splits.labels), dtype=str)}
    if y.ndim == 1 and y.dtype.kind in "iu":  # class indices; a task whose targets are not goes without y
        arrays["y"] = y.astype(np.int64)
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return {"run": str(run_dir), "split": split, "out": str(out), "samples": int(len(x)),
            "shape": list(x.shape[1:]), "labelled": "y" in arrays}


def run(args: argparse.Namespace) -> int:
    report = write_split(args.run, args.split, args.out)
    print(f"wrote {report['samples']} {args.split} samples of {args.run} to {args.out}")
    if args.json:
        emit_json(report)
    return 0
