"""The build table: the bundle path a user copies is never cut, however narrow the output."""

from __future__ import annotations

import io

from rich.console import Console

from toolchain.commands.build import _print_table


def test_a_long_bundle_path_is_folded_not_cut():
    path = "/home/someone/projects/fleet-cameras/runs/a-rather-long-run-name/bundles/openvino-int8-with-a-long-suffix"
    report = {"target": "openvino", "precision": "int8", "bundle": path, "routing": {"threshold": 0.5},
              "verify": {"status": "passed"},
              "metrics": {"accuracy": 0.98, "reference_accuracy": 0.99, "agreement": 0.97, "max_abs_logit_diff": 0.1,
                          "size_bytes": 2048, "build_seconds": 1.5}}
    out = io.StringIO()
    _print_table([report], [], [], console=Console(file=out, width=160, color_system=None))  # as the command prints it
    text = out.getvalue()
    assert "…" not in text
    joined = "".join(line.split("│")[-2].strip() for line in text.splitlines() if line.count("│") > 2)
    assert path in joined
