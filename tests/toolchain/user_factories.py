"""User factories for the ``python:module:function`` data and model sources (tests)."""

from __future__ import annotations

import numpy as np


def tabular():
    """A 3-class tabular problem: 12 features, separable by a few of them."""
    rng = np.random.default_rng(0)
    n = 360
    y = np.repeat(np.arange(3), n // 3)
    X = rng.normal(size=(n, 12)).astype(np.float32) * 2.0 + 5.0
    X[:, 0] += y * 8.0
    X[:, 1] -= y * 6.0
    return {"X": X, "y": y, "labels": ["low", "mid", "high"]}


def tiny_mlp(*, input_shape, num_classes):
    import torch.nn as nn

    (f,) = input_shape
    return nn.Sequential(nn.Linear(f, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes))


def not_a_model(*, input_shape, num_classes):
    return "nope"


def broken_data():
    raise RuntimeError("database offline")


def bad_shape():
    return np.zeros((10, 2, 3)), np.zeros(10, dtype=np.int64)
