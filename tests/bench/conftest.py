from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hw_bench.data import TestData

from .tinybundle import make_bundle


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def tiny_data() -> TestData:
    rng = np.random.default_rng(1)
    return TestData(rng.uniform(0, 16, size=(40, 1, 8, 8)).astype(np.float32), np.zeros(40, np.int64), "random")
