from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.targets.contract import TargetContract


class TestTfliteContract(TargetContract):
    target_name = "tflite"

    def test_int8_is_full_integer(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from edgecore.spec import Precision

        out, art = self._build(target, Precision.INT8, tiny_source, built, tmp_path_factory)
        it = Interpreter(model_path=str(out / art.main))
        assert it.get_input_details()[0]["dtype"] == np.int8
        assert it.get_output_details()[0]["dtype"] == np.int8
        kinds = {d["dtype"] for d in it.get_tensor_details() if len(d["shape"]) > 1}
        assert np.float32 not in kinds, "float tensors left in a full-integer model"


def test_int8_build_is_converted_in_eval_mode_without_the_training_mode_warning(tiny_source: Any, tmp_path,
                                                                              caplog) -> None:
    """The student is exported in eval mode; litert-torch must not be told otherwise (it warned on every build)."""
    import logging

    from edgecore.spec import Precision
    from targets import get_target

    target = get_target("tflite")
    for ok, why in (target.build_available(), target.available()):
        if not ok:
            pytest.skip(why)
    with caplog.at_level(logging.WARNING):
        target.build(tiny_source.source, Precision.INT8, tiny_source.rep, tmp_path)
    assert not [r for r in caplog.records if "training mode" in r.getMessage()]
