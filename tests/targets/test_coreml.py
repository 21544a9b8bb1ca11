from __future__ import annotations

import sys
from typing import Any

import pytest

from edgecore.errors import BuildError
from targets import Precision, get_target
from targets.coreml_target import check_structure
from tests.targets.contract import TargetContract


class TestCoreMLContract(TargetContract):
    target_name = "coreml"

    def test_structure_of_int8_weights(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        out, art = self._build(target, Precision.INT8, tiny_source, built, tmp_path_factory)
        s = art.details["structure"]
        assert s["quantized_weights"] >= s["compute_ops"] > 0
        with pytest.raises(BuildError, match="input 'image' missing"):
            check_structure(out / art.main, input_name="image", sample_shape=(1, 8, 8), precision=Precision.INT8)

    def test_fp16_keeps_float_weights(self, target, tiny_source: Any, built, tmp_path_factory) -> None:
        out, art = self._build(target, Precision.FP16, tiny_source, built, tmp_path_factory)
        assert art.details["structure"]["quantized_weights"] == 0


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_not_available_off_macos() -> None:
    ok, why = get_target("coreml").available()
    assert not ok and "macOS" in why
