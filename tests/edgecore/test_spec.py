"""`edgecore.spec.InputSpec`: the preprocessing every side shares."""

from __future__ import annotations

import numpy as np

from edgecore.spec import InputSpec


def _formula(raw: np.ndarray, spec: InputSpec, bshape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(raw, dtype=np.float64) * spec.scale
    return (x - np.asarray(spec.mean).reshape(bshape)) / np.asarray(spec.std).reshape(bshape)


def test_preprocess_is_the_documented_arithmetic() -> None:
    """``(raw * scale - mean) / std``, computed as ``raw * a + b`` in float32 (`affine`): for any input dtype and
    rank, exactly the two float32 operations a runner folds into its input, and within float32 rounding of the
    formula."""
    rng = np.random.default_rng(0)
    spec = InputSpec("input", (None, 3, 5, 5), scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    a, b = spec.affine()
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (1, 3, 1, 1)
    for dtype in (np.uint8, np.float32, np.float64):
        raw = rng.integers(0, 256, size=(2, 3, 5, 5)).astype(dtype)
        got = spec.preprocess(raw)
        assert got.dtype == np.float32 and np.array_equal(got, np.multiply(raw, a, dtype=np.float32) + b)
        np.testing.assert_allclose(got, _formula(raw, spec, (1, 3, 1, 1)), rtol=1e-6, atol=1e-6)
    gray = InputSpec("input", (None, 1, 8, 8), scale=1 / 16, mean=(0.3049,), std=(0.3758,))  # one channel
    for dtype in (np.uint8, np.float32, np.float64):
        raw = rng.integers(0, 17, size=(3, 1, 8, 8)).astype(dtype)
        want = _formula(raw, gray, (1, 1, 1, 1))
        for r in (raw, raw[:1], raw[0]):  # a batch, a batch of one, one sample without the batch axis
            got = gray.preprocess(r)
            assert got.dtype == np.float32 and got.shape == r.shape
            np.testing.assert_allclose(got, want[: len(got)] if r.ndim == 4 else want[0], rtol=1e-6, atol=1e-6)
    a1, b1 = gray.affine()  # for one sample without its batch axis, shaped to give it one
    assert (np.multiply(raw[0], a1) + b1).shape == (1, 1, 8, 8)
    flat = InputSpec("x", (None, 4), layout="NF", scale=2.0, mean=(1.0, 2.0, 3.0, 4.0), std=(1.0, 2.0, 4.0, 8.0))
    v = rng.normal(size=(3, 4))
    np.testing.assert_allclose(flat.preprocess(v), _formula(v, flat, (1, 4)), rtol=1e-6, atol=1e-6)
    plain = InputSpec("x", (None, 4), layout="NF", scale=0.5)  # no mean: a multiply alone
    assert plain.affine()[1] is None
    assert np.array_equal(plain.preprocess(v), np.float32(v) * np.float32(0.5))
    assert flat == InputSpec("x", (None, 4), layout="NF", scale=2.0, mean=(1.0, 2.0, 3.0, 4.0), std=(1.0, 2.0, 4.0, 8.0))
