"""`edgecore.spec.InputSpec`: the preprocessing every side shares."""

from __future__ import annotations

import numpy as np

from edgecore.spec import InputSpec


def test_preprocess_is_the_documented_arithmetic_exactly() -> None:
    """Cached constants change nothing: ``(raw * scale - mean) / std`` in float32, for any input dtype and rank."""
    rng = np.random.default_rng(0)
    spec = InputSpec("input", (None, 3, 5, 5), scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for dtype in (np.uint8, np.float32, np.float64):
        raw = rng.integers(0, 256, size=(2, 3, 5, 5)).astype(dtype)
        x = np.asarray(raw, dtype=np.float32) * np.float32(spec.scale)
        want = (x - np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
        got = spec.preprocess(raw)
        assert got.dtype == np.float32 and np.array_equal(got, want)
    gray = InputSpec("input", (None, 1, 8, 8), scale=1 / 16, mean=(0.3049,), std=(0.3758,))  # one channel: scalars
    for dtype in (np.uint8, np.float32, np.float64):
        raw = rng.integers(0, 17, size=(3, 1, 8, 8)).astype(dtype)
        want = (np.asarray(raw, np.float32) * np.float32(1 / 16) - np.float32([0.3049]).reshape(1, 1, 1, 1)) \
            / np.float32([0.3758]).reshape(1, 1, 1, 1)
        for r in (raw, raw[:1], raw[0]):  # a batch, a batch of one, one sample without the batch axis
            got = gray.preprocess(r)
            assert got.dtype == np.float32 and got.shape == r.shape
            assert np.array_equal(got, want[: len(got)] if r.ndim == 4 else want[0])
    flat = InputSpec("x", (None, 4), layout="NF", scale=2.0, mean=(1.0, 2.0, 3.0, 4.0), std=(1.0, 2.0, 4.0, 8.0))
    v = rng.normal(size=(3, 4))
    assert np.array_equal(flat.preprocess(v), (v.astype(np.float32) * np.float32(2.0) - np.float32([1, 2, 3, 4])) / np.float32([1, 2, 4, 8]))
    assert flat == InputSpec("x", (None, 4), layout="NF", scale=2.0, mean=(1.0, 2.0, 3.0, 4.0), std=(1.0, 2.0, 4.0, 8.0))
