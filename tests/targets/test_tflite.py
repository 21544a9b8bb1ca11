from __future__ import annotations

from typing import Any

import numpy as np

from tests.targets.contract import TargetContract


class TestTfliteContract(TargetContract):
    target_name = "tflite"

    def test_int8_is_full_integer(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from targets import Precision

        out, art = self._build(target, Precision.INT8, tiny_source, built, tmp_path_factory)
        it = Interpreter(model_path=str(out / art.main))
        assert it.get_input_details()[0]["dtype"] == np.int8
        assert it.get_output_details()[0]["dtype"] == np.int8
        kinds = {d["dtype"] for d in it.get_tensor_details() if len(d["shape"]) > 1}
        assert np.float32 not in kinds, "float tensors left in a full-integer model"
