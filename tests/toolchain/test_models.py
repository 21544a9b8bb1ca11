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
