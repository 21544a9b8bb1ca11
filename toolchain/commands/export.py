"""``toolchain export``: ONNX (fp32 student, QDQ student, teacher), validated in ONNX Runtime."""

from __future__ import annotations

import argparse
from typing import Any

from toolchain.commands._pipeline_cli import add_parser, run_stage


def register(subparsers: Any) -> None:
    p = add_parser(
        subparsers, "export", help="export student.onnx, student_qdq.onnx, teacher.onnx and check them in ORT",
        description="Export the run's models to ONNX with the dynamo exporter; each passes onnx.checker and must "
        "match PyTorch in ONNX Runtime.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain import pipeline

    return run_stage(args, pipeline.export)
