"""What routing is fitted on: the calibration split when the run has one, else the validation split (said)."""

from __future__ import annotations

import numpy as np

from toolchain.data import Splits
from toolchain.reference import MIN_CALIBRATION_ROWS, _fit_split


def _splits(n_cal: int) -> Splits:
    def part(n: int, v: float) -> tuple[np.ndarray, np.ndarray]:
        return np.full((n, 4), v, np.float32), np.zeros(n, np.int64)

    return Splits(train=part(50, 0), val=part(40, 1), test=part(40, 2), input_spec=None, labels=("a", "b"),  # type: ignore[arg-type]
                  sha256="x", calibration=part(n_cal, 3))


def test_the_calibration_split_is_used_when_there_is_one():
    name, (x, _) = _fit_split(_splits(MIN_CALIBRATION_ROWS), None)
    assert name == "calibration" and float(x[0, 0]) == 3.0


def test_too_small_a_calibration_split_or_a_device_refresh_falls_back_to_validation():
    assert _fit_split(_splits(MIN_CALIBRATION_ROWS - 1), None)[0] == "validation"
    assert _fit_split(_splits(0), None)[0] == "validation"
    name, (x, _) = _fit_split(_splits(100), slice(-10, None))  # a refresh's collected rows sit at val's end
    assert name == "validation" and float(x[0, 0]) == 1.0
