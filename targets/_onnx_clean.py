"""Deployment cleanup of an exported ONNX graph.

The torch exporter writes per-node debugging metadata (stack traces, FX node
text, name scopes) and intermediate ``value_info`` that no runtime needs; on a
small student that is most of the file. It can also leave a training-mode
``Dropout`` in graphs exported from pt2e QAT programs, which ONNX Runtime
ignores at inference but OpenVINO and TensorRT refuse. This pass drops both
(Dropout at inference is the identity), then re-checks the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecore.errors import BuildError


def clean_onnx(src: Path, dst: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise BuildError(f"{src}: unreadable ONNX ({e})") from e
    g = model.graph
    outputs = {o.name for o in g.output}
    removed_dropout = 0
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        if n.op_type == "Dropout" and n.domain in ("", "ai.onnx") and n.output[0] not in outputs:
            rename[n.output[0]] = n.input[0]
            removed_dropout += 1
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[i] = name
        del n.metadata_props[:]
        n.doc_string = ""
    del g.node[:]
    g.node.extend(keep)
    before = len(g.value_info)
    del g.value_info[:]
    del model.metadata_props[:]
    g.doc_string = ""
    model.doc_string = ""
    # initializers no longer used (e.g. Dropout's ratio / training_mode) go too
    used = {i for n in g.node for i in n.input} | outputs
    unused = [init for init in g.initializer if init.name not in used]
    for init in unused:
        g.initializer.remove(init)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise BuildError(f"{src}: graph invalid after cleanup ({e})") from e
    onnx.save(model, str(dst))
    return {"removed_dropout": removed_dropout, "removed_value_info": before, "removed_initializers": len(unused)}
