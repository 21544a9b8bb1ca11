from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from calibration.confidence import Measure, calibrate, confidence, ece, fit_temperature, softmax


def _overconfident(n: int = 2000, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits drawn from a calibrated model, then sharpened 3x: the fit must find T close to 3."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, c)) * 1.5
    p = softmax(true_logits)
    y = np.array([rng.choice(c, p=row) for row in p])
    return true_logits * 3.0, y


def test_temperature_recovers_the_sharpening_and_lowers_ece() -> None:
    logits, y = _overconfident()
    fit = calibrate(logits, y)
    assert 2.5 < fit.temperature < 3.5
    assert fit.ece_after < fit.ece_before / 2
    assert fit.nll_after < fit.nll_before


def test_temperature_does_not_change_predictions() -> None:
    logits, _ = _overconfident(200)
    for m in Measure:
        c1 = confidence(logits, measure=m, temperature=1.0)
        assert c1.shape == (200,) and np.all((c1 >= 0) & (c1 <= 1 + 1e-12))
    assert np.array_equal(softmax(logits, temperature=3).argmax(1), logits.argmax(1))


def test_measures_rank_a_confident_row_above_an_uncertain_one() -> None:
    logits = np.array([[10.0, 0.0, 0.0], [1.0, 0.9, 0.8]])
    for m in ("max_prob", "margin", "entropy"):
        c = confidence(logits, measure=m)
        assert c[0] > c[1], m
    with pytest.raises(ValueError):
        confidence(logits, measure="bogus")
    with pytest.raises(ValueError):
        confidence(logits, temperature=0)


def test_ece_of_a_perfectly_calibrated_toy() -> None:
    # confidence 0.75 everywhere, right 75% of the time -> ECE 0
    logits = np.log(np.array([[0.75, 0.25]] * 4))
    y = np.array([0, 0, 0, 1])
    assert ece(logits, y) == pytest.approx(0.0, abs=1e-9)
    assert fit_temperature(logits, y) == pytest.approx(1.0, rel=0.05)


def test_confidence_module_is_numpy_only() -> None:
    code = "import sys, calibration.confidence; print(sorted(m for m in ('torch','tensorflow','scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_tiny_separable_split_bounds_the_temperature(caplog) -> None:
    """27 samples all classified right: the NLL wants T -> 0; kept in [0.5, 2] with a warning."""
    from calibration.confidence import calibrate, confidence, temperature_bounds

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 27)
    logits = rng.normal(size=(27, 5))
    logits[np.arange(27), y] += 8.0  # every argmax right
    assert (logits.argmax(1) == y).all()
    with caplog.at_level("WARNING", logger="calibration.confidence"):
        fit = calibrate(logits, y)
    assert fit.fitted < 0.2 and fit.bounded and fit.temperature == 0.5  # the NLL flattens to 0 as T -> 0
    assert temperature_bounds(27) == (0.5, 2.0)
    assert "27 validation samples" in caplog.text and "bounded to [0.5, 2]" in caplog.text
    conf = confidence(logits, measure="max_prob", temperature=fit.temperature)
    assert len(np.unique(conf)) == 27  # still something to rank, not 1.0 everywhere


def test_large_split_is_not_bounded(caplog) -> None:
    from calibration.confidence import calibrate

    logits, y = _overconfident()
    with caplog.at_level("WARNING", logger="calibration.confidence"):
        fit = calibrate(logits, y)
    assert not fit.bounded and fit.temperature == fit.fitted and not caplog.text


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.3])
def test_one_row_fast_path_matches_the_batch_path(temperature: float) -> None:
    """The device's one-input path (plain floats) gives what the vectorised path gives the same row."""
    import numpy as np

    from edgecore.confidence import confidence

    rng = np.random.default_rng(3)
    for _ in range(200):
        row = (rng.normal(size=(1, 10)) * rng.uniform(0.1, 30)).astype(np.float32)
        one = confidence(row, temperature=temperature)
        batch = confidence(np.vstack([row, row[:, ::-1]]), temperature=temperature)
        assert one.shape == (1,) and one.dtype == np.float64
        assert one[0] == pytest.approx(batch[0], rel=1e-12, abs=1e-15)

