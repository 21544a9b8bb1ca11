"""``hw-bench peers`` on a tiny 8x8 one-channel convnet: the real quantizers of ORT, NNCF and litert-torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hw_bench.data import TestData, save_npz
from hw_bench.loadgen import Settings
from hw_bench.peers import PEERS, OrtQuantizeStatic, compare_peers, markdown, model_dir_input
from targets.base import first_missing

pytest.importorskip("torch")

FAST = Settings(min_duration_s=0.2, min_queries=10, warmup=2)


def _tiny_model_dir(root: Path) -> tuple[Path, TestData]:
    """What ``hw-bench models`` writes (model.pt, model.onnx), for a tiny convnet, plus labelled data."""
    import torch

    from toolchain.config import ModelConfig
    from toolchain.export import export_onnx
    from toolchain.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(family="resnet", width=4, depth=1, dropout=0.0), input_shape=(1, 8, 8),
                        num_classes=10).eval()
    root.mkdir(parents=True)
    torch.save({"module": model, "name": "tiny8"}, root / "model.pt")
    export_onnx(model, root / "model.onnx", input_shape=(1, 8, 8), opset=18)
    raw = np.random.default_rng(3).integers(0, 256, size=(64, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():  # labels: the fp32 model's own answers, so accuracy = agreement with fp32
        y = model(torch.from_numpy(raw / 255)).argmax(1).numpy().astype(np.int64)
    return root, TestData(raw, y, "tiny8-labelled")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TestData, dict[str, Any]]:
    mdir, data = _tiny_model_dir(tmp_path_factory.mktemp("peers") / "tiny8")
    src = model_dir_input(mdir, data=data)
    result = compare_peers(src, out_dir=mdir.parent / "out", settings=FAST, repetitions=2)
    return mdir, data, result


def test_every_runtime_has_a_row_with_accuracy_and_ratio_or_a_reason(tiny: tuple[Path, TestData, dict[str, Any]]) -> None:
    _, _, result = tiny
    assert [r["target"] for r in result["rows"]] == [p.target for p in PEERS]
    for row, peer in zip(result["rows"], PEERS):
        ok, why = peer.available()
        if not ok:  # the tool is absent here: the row says so and holds no figures
            assert why in row["skipped"] and "ours" not in row
            continue
        assert "skipped" not in row, row.get("skipped")
        ratio = row["speedup_ours_over_peer"]
        assert ratio["rounds"] == 2 and ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["median"] > 0
        for side in (row["ours"], row["peer"]):
            assert 0.0 <= side["accuracy"] <= 1.0 and 0.0 <= side["agreement_fp32"] <= 1.0
            assert side["p50_ms"] > 0 and len(side["round_scores"]) == 2
        assert row["ours"]["artifact"] != row["peer"]["artifact"]
        assert Path(row["peer"]["artifact_path"]).is_file()  # a real artifact of the peer's own tool
        assert row["verdict"]
    assert result["env"]["cpu"]["model"] and result["env"]["load_avg"] is not None
    assert result["data"] == {"source": "tiny8-labelled", "n": 64}


def test_peer_artifacts_are_what_their_tools_write(tiny: tuple[Path, TestData, dict[str, Any]]) -> None:
    import onnx

    mdir, _, result = tiny
    rows = {r["target"]: r for r in result["rows"] if "skipped" not in r}
    if "onnx" in rows:
        g = onnx.load(rows["onnx"]["peer"]["artifact_path"]).graph
        ops = {n.op_type for n in g.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        # ORT's default: int8 activations (ours rewrites them to uint8)
        zp = [i for i in g.initializer if i.name.endswith("_zero_point")]
        assert zp and any(i.data_type == onnx.TensorProto.INT8 for i in zp)
    if "openvino" in rows:
        assert "FakeQuantize" in Path(rows["openvino"]["peer"]["artifact_path"]).read_text()
    # ours was built where `hw-bench models` keeps it
    for t in rows:
        assert (mdir / "bundles" / f"{t}-int8" / "manifest.json").is_file()


class _AbsentTool(OrtQuantizeStatic):
    tool = "a quantizer that is not installed"

    def available(self) -> tuple[bool, str]:
        missing = first_missing(("no_such_quantizer_pkg", "pip install no-such-quantizer"))
        return (False, missing) if missing else (True, "")


class _BrokenRecipe(OrtQuantizeStatic):
    """A real quantize_static call that fails (a calibration input of the wrong shape)."""

    tool = "quantize_static with a wrong calibration shape"

    def build(self, src: Any, out_dir: Path) -> Path:
        import dataclasses

        bad = dataclasses.replace(src.calibration, inputs=src.calibration.inputs[:, :, :4, :4])
        return super().build(dataclasses.replace(src, calibration=bad), out_dir)


def test_a_peer_that_cannot_be_built_is_reported_not_faked(tiny: tuple[Path, TestData, dict[str, Any]],
                                                          tmp_path: Path) -> None:
    mdir, data, _ = tiny
    src = model_dir_input(mdir, data=data)
    result = compare_peers(src, out_dir=tmp_path, settings=FAST, repetitions=2,
                           peers=(_AbsentTool(), _BrokenRecipe()))
    absent, broken = result["rows"]
    assert "no-such-quantizer-pkg is not installed" in absent["skipped"] and "ours" not in absent
    assert "could not build" in broken["skipped"] and "ours" not in broken and "speedup_ours_over_peer" not in broken
    table = markdown(result)
    assert table.count("skipped:") == 2


def test_cli_prints_the_table_and_exits_0(tiny: tuple[Path, TestData, dict[str, Any]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from hw_bench.cli import main

    mdir, data, _ = tiny
    save_npz(tmp_path / "data.npz", data)
    rc = main(["peers", str(mdir), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data.npz"),
               "--targets", "onnx", "--repetitions", "2", "--duration", "0.2", "--min-queries", "10",
               "--warmup", "2", "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| runtime | peer |" in out and "| onnx | onnxruntime.quantization.quantize_static |" in out
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["kind"] == "hw_bench.peers" and [r["target"] for r in doc["rows"]] == ["onnx"]
    assert (tmp_path / "out" / "peers.md").is_file()
