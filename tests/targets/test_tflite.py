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


class _CatOfTwoRanges:
    """``cat([relu(a), b])`` with ``b`` all negative: LiteRT's own ``cat`` annotation clipped ``b`` at 0."""

    @staticmethod
    def make() -> Any:
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
                self.b = torch.nn.Conv2d(1, 4, 3, padding=1)
                with torch.no_grad():
                    self.b.bias.fill_(-4.0)

            def forward(self, x: Any) -> Any:
                return torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1).flatten(1)

        return Net().eval()


def test_int8_cat_of_differently_ranged_inputs_keeps_every_input(tmp_path) -> None:
    import torch

    from edgecore.representative import RepresentativeSet
    from edgecore.spec import InputSpec, Precision
    from targets import get_target
    from targets.base import ModelSource

    target = get_target("tflite")
    for ok, why in (target.build_available(), target.available()):
        if not ok:
            pytest.skip(why)
    model = _CatOfTwoRanges.make()
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    rep = RepresentativeSet(inputs=x, labels=np.full(32, -1, np.int64), indices=np.arange(32), sha256="0" * 64)
    spec = InputSpec(name="input", shape=(None, 1, 8, 8), layout="NCHW", scale=1.0, mean=(0.0,), std=(1.0,))
    src = ModelSource(name="cat", input_spec=spec, labels=("a",), onnx_fp32=tmp_path / "unused.onnx",
                      torch_model=lambda: model)
    art = target.build(src, Precision.INT8, rep, tmp_path)
    assert art.details["cat_inputs_shared"] == 1
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = target.load(tmp_path, art.info(), spec).run(x)
    neg = ref < -1.0  # the second branch: clipped to 0 before
    assert neg.sum() > ref.size // 3
    assert got[neg].max() < 0, "the negative branch was clipped at 0"
    err = np.abs(got - ref)
    step = (ref.max() - ref.min()) / 255  # one int8 step of the shared scale
    assert err.mean() < step and err.max() < 0.1 * (ref.max() - ref.min()), (err.mean(), err.max(), step)
