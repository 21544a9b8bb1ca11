"""A second, non-digits user model: sklearn's bundled wine data (13 features, 3 classes) and an MLP."""

from __future__ import annotations


def wine():
    from sklearn.datasets import load_wine

    d = load_wine()
    return {"X": d.data.astype("float32"), "y": d.target, "labels": list(d.target_names)}


def wine_mlp(*, input_shape, num_classes):
    import torch.nn as nn

    (f,) = input_shape
    return nn.Sequential(nn.Linear(f, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, num_classes))
