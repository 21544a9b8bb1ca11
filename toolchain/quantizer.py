"""The QAT quantizer: Q/DQ placed where CPU runtimes fuse them (ONNX Runtime's QDQ recipe).

torchao's x86 quantizer follows Inductor's fusion recipe: it quantizes the
*inputs* of convolutions and leaves ``conv + add (+ relu)`` outputs in float,
because Inductor fuses the add into the convolution. Exported to QDQ ONNX,
that placement leaves a third of the convolutions and every residual ``Add``
in fp32 after ONNX Runtime's optimizer (6 of 15 convolutions on the digits
student), and int8 runs slower than fp32.

`ort_qdq_quantizer` places them the way ORT's ``quantize_static`` does (and
OpenVINO and LiteRT accept): every Conv/Linear reads a quantized input and
quantized per-channel weights, and its output is quantized after the
BatchNorm/ReLU it fuses with; every ``add`` reads quantized inputs and has a
quantized output (after its ReLU). Activations are uint8 affine, weights int8
symmetric per channel (±63 with 7-bit weights), the specs of torchao's x86
QAT config, so ORT fuses every group into QLinearConv / QLinearAdd / QGemm.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

__all__ = ["make_quantizer", "ort_qdq_quantizer"]


def make_quantizer(bits: int, *, is_qat: bool = True) -> Any:
    """torchao's x86 config (QAT or PTQ) with symmetric per-channel weights of ``bits`` bits, Q/DQ placed by
    `ort_qdq_quantizer`.

    Weights are restricted-range symmetric: ±127 for 8 bits (the int8 weight spec of TFLite, TensorRT and
    OpenVINO's symmetric FakeQuantize; torchao's default -128..127 puts a -128 no symmetric kernel expects),
    ±63 for 7 bits (CPUs without VNNI, whose u8*s8 multiply-add saturates with full 8-bit weights).
    """
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    if bits not in (7, 8):
        raise ValueError(f"QDQ weight bits must be 7 or 8, got {bits}")
    qcfg = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    q = (1 << (bits - 1)) - 1
    qcfg = dataclasses.replace(qcfg, weight=dataclasses.replace(qcfg.weight, quant_min=-q, quant_max=q))
    return ort_qdq_quantizer(qcfg)


def _ops() -> tuple[set[Any], set[Any], set[Any], set[Any]]:
    import torch

    aten = torch.ops.aten
    compute = {aten.conv1d.default, aten.conv2d.default, aten.linear.default}
    norms = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
             aten._native_batch_norm_legit.default, aten.cudnn_batch_norm.default}
    relus = {aten.relu.default, aten.relu_.default}
    adds = {aten.add.Tensor, aten.add_.Tensor}
    return compute, norms, relus, adds


def _fused_end(node: Any, norms: set[Any], relus: set[Any]) -> Any:
    """The last node of ``node`` [-> batch_norm [-> getitem 0]] [-> relu]: where its output is quantized."""
    cur = node
    allowed = norms | relus
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_function":
            break
        if nxt.target is operator.getitem and cur.target in norms and nxt.args[1] == 0:
            cur = nxt
            continue
        if nxt.target not in allowed or (cur.target in relus):
            break
        cur = nxt
    return cur


def ort_qdq_quantizer(config: Any) -> Any:
    """A torchao pt2e ``Quantizer`` placing Q/DQ by ORT's QDQ recipe with ``config``'s specs."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    class OrtQdqQuantizer(Quantizer):  # defined here: torchao is imported only when quantizing
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.config = cfg

        def annotate(self, model: Any) -> Any:
            _annotate(model.graph, self.config)
            return model

        def validate(self, model: Any) -> None:
            return None

    return OrtQdqQuantizer(config)


def _annotate(graph: Any, cfg: Any) -> None:
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    compute, norms, relus, adds = _ops()
    act, weight = cfg.input_activation, cfg.weight
    quantized_out: set[Any] = set()  # nodes whose output gets an observer

    def out_annotate(end: Any) -> None:
        ann = end.meta.setdefault("quantization_annotation", QuantizationAnnotation())
        ann.output_qspec, ann._annotated = act, True
        quantized_out.add(end)

    def in_map(inputs: list[Any]) -> dict[Any, Any]:
        # an input already quantized at its producer's output shares that observer (one Q/DQ pair)
        return {i: SharedQuantizationSpec(i) if i in quantized_out else act for i in inputs if hasattr(i, "op")}

    for node in graph.nodes:
        if node.op != "call_function" or "quantization_annotation" in node.meta:
            continue
        if node.target in compute:
            qmap = in_map([node.args[0]])
            qmap[node.args[1]] = weight
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
        elif node.target in adds and all(hasattr(a, "op") for a in node.args[:2]):
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map=in_map(list(node.args[:2])), _annotated=True)
        else:
            continue
        end = _fused_end(node, norms, relus)
        if end is node:
            node.meta["quantization_annotation"].output_qspec = act
            quantized_out.add(node)
        else:
            for mid in _chain(node, end):
                mid.meta.setdefault("quantization_annotation", QuantizationAnnotation())._annotated = True
            out_annotate(end)


def _chain(start: Any, end: Any) -> list[Any]:
    """Nodes strictly after ``start`` up to ``end`` along single users."""
    out, cur = [], start
    while cur is not end:
        cur = next(iter(cur.users))
        out.append(cur)
    return out
