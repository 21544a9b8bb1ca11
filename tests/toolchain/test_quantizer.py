"""The QAT quantizer places Q/DQ so that ONNX Runtime runs every conv, add and linear quantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest


@pytest.mark.parametrize("bits", [7, 8])
def test_qat_graph_runs_every_conv_add_gemm_quantized_in_ort(tmp_path: Path, bits: int) -> None:
    import torch
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from targets._qdq import ort_fusion, qdq_scheme, quantize_global_pool
    from toolchain.config import ModelConfig
    from toolchain.export import export_onnx, ort_logits
    from toolchain.models import build_model
    from toolchain.passes.qat import batch_dim, cpu_has_vnni, make_quantizer

    torch.manual_seed(0)
    # a residual network: conv+bn+relu, conv+bn feeding a residual add (+relu), pooling, linear
    model = build_model(ModelConfig(family="resnet", width=8, depth=1, dropout=0.0), input_shape=(1, 8, 8),
                        num_classes=10).train()
    x = torch.randn(64, 1, 8, 8)
    graph = torch.export.export(model, (x[:8],), dynamic_shapes=({0: batch_dim()},)).module()
    prepared = prepare_qat_pt2e(graph, make_quantizer(bits))
    with torch.no_grad():
        for i in range(0, 64, 16):
            prepared(x[i : i + 16])
    pt2e.move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    path = tmp_path / "qat.onnx"
    export_onnx(converted, path, input_shape=(1, 8, 8), opset=18)

    src_ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    graph_report = ort_fusion(path)
    # the exporter writes the global pool as a float ReduceMean; the onnx target's build quantizes it
    assert graph_report["float_compute"] == {"ReduceMean": 1}, graph_report
    pooled = onnx.load(str(path))
    assert quantize_global_pool(pooled) == 1
    onnx.save(pooled, tmp_path / "qat_pooled.onnx")
    assert ort_fusion(tmp_path / "qat_pooled.onnx")["float_compute"] == {}
    q = graph_report["quantized_ops"]
    assert q.get("QLinearConv") == src_ops.count("Conv")
    assert q.get("QLinearAdd") == src_ops.count("Add") > 0
    assert q.get("QGemm") == 1
    scheme = qdq_scheme(onnx.load(str(path)))
    assert scheme["activation_dtype"] == "uint8" and scheme["per_channel_weights"]
    w = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
         if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert max(int(np.abs(a.astype(np.int32)).max()) for a in w) <= (63 if bits == 7 else 127)  # restricted range: no -128
    # the ORT graph computes what the converted PyTorch program does (8-bit weights saturate
    # ORT's u8*s8 kernels on CPUs without VNNI: the reason 7 bits is the default there)
    if bits == 8 and not cpu_has_vnni():
        return
    with torch.no_grad():
        ref = converted(x).numpy()
    agree = float((ort_logits(path, x.numpy()).argmax(1) == ref.argmax(1)).mean())
    assert agree >= 0.9
