"""hw-bench tables are not cut to 80 columns when stdout is a pipe or a log."""

from __future__ import annotations

from hw_bench.tables import print_rows


def test_results_table_is_wide_when_not_a_terminal(capsys) -> None:
    name = "resnet-student-with-a-long-name openvino/int8"
    run = {"results": [{
        "artifact": name, "device_id": "bench-host-number-seven", "scenario": "single-stream",
        "latency_ms": {"p50": 0.123, "p99": 0.456}, "throughput_sps": 8123.4, "speedup_vs_pytorch": 3.21,
        "accuracy": {"accuracy": 0.9712},
    }]}
    print_rows(run)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if name in line)  # one line, nothing wrapped or cut
    for cell in ("bench-host-number-seven", "single-stream", "0.123", "0.456", "8123", "3.21×", "0.9712"):
        assert cell in row
    assert "vs PyTorch" in out and "throughput/s" in out
