"""Model families adapt to any input size and channel count."""

from __future__ import annotations

import pytest
import torch

from edgecore.errors import ModelError
from toolchain.config import ModelConfig
from toolchain.models import build_model, count_macs, count_params


@pytest.mark.parametrize("family", ["resnet", "mobilenet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 64, 48), (2, 5, 5)])
def test_image_families_any_size(family, shape):
    m = build_model(ModelConfig(family=family, width=8, depth=1), input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, *shape)).shape == (2, 7)


def test_mobilenet_multipliers_scale_the_model():
    base = build_model(ModelConfig(family="mobilenet", width=16), input_shape=(1, 8, 8), num_classes=10)
    wide = build_model(ModelConfig(family="mobilenet", width=16, width_mult=2.0), input_shape=(1, 8, 8), num_classes=10)
    deep = build_model(ModelConfig(family="mobilenet", width=16, depth_mult=2.0), input_shape=(1, 8, 8), num_classes=10)
    assert count_params(wide) > 2 * count_params(base)
    assert len(list(deep.blocks)) > len(list(base.blocks))
    assert count_macs(wide, (1, 8, 8)) > count_macs(base, (1, 8, 8))


def test_mlp_and_user_model():
    m = build_model(ModelConfig(family="mlp", hidden=(16,)), input_shape=(12,), num_classes=3).eval()
    assert m(torch.zeros(4, 12)).shape == (4, 3)
    u = build_model(ModelConfig(family="python:tests.toolchain.user_factories:tiny_mlp"), input_shape=(12,), num_classes=3)
    assert u(torch.zeros(4, 12)).shape == (4, 3)


def test_model_errors():
    with pytest.raises(ModelError, match="needs image inputs"):
        build_model(ModelConfig(family="resnet"), input_shape=(12,), num_classes=3)
    with pytest.raises(ModelError, match="returned str, not a torch.nn.Module"):
        build_model(ModelConfig(family="python:tests.toolchain.user_factories:not_a_model"), input_shape=(12,), num_classes=3)
    with pytest.raises(ModelError, match="unknown model family 'vgg'"):
        build_model(ModelConfig(family="vgg"), input_shape=(1, 8, 8), num_classes=3)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 224, 224), (1, 28, 28), (3, 5, 7), (1, 1, 40), (2, 100), (40,)])
def test_domain_gate_takes_any_sample_shape_and_exports_to_onnx(shape, tmp_path):
    """Fixed pooling kernels (no adaptive pooling whose exporters refuse sizes that do not divide)."""
    from toolchain.models import DomainGate

    gate = DomainGate(shape).eval()
    x = torch.randn(4, *shape)
    assert gate(x).shape == (4, 1)
    torch.onnx.export(gate, (x[:1],), str(tmp_path / "gate.onnx"), dynamo=False)
    assert count_params(gate) < 20_000


def test_gated_experts_answers_with_the_model_its_gate_picks():
    from toolchain.models import GatedExperts

    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    expert = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))

    class Sign(torch.nn.Module):  # first feature positive: the base's input; a steep logit, so g is 0 or 1
        def forward(self, x):
            return 100.0 * x.flatten(1)[:, :1]

    m = GatedExperts(base, expert, Sign()).eval()
    x = torch.randn(64, 1, 2, 2)
    with torch.no_grad():
        y, yb, ye = m(x), base(x), expert(x)
    pos = x.flatten(1)[:, 0] > 0.1
    neg = x.flatten(1)[:, 0] < -0.1
    torch.testing.assert_close(y[pos], yb[pos], atol=1e-4, rtol=0)
    torch.testing.assert_close(y[neg], ye[neg], atol=1e-4, rtol=0)
