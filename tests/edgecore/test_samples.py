"""The collected-samples contract: JSON and table rows round-trip, bad records name the field."""

import numpy as np
import pytest

from edgecore.samples import Sample, SampleError, SamplePage
from edgecore.wire import encode_tensor


def _sample(**kw):
    base = dict(id=3, device="dev-1", received=1700000000.5, input=np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8),
                teacher_probs=np.array([0.1, 0.7, 0.2], np.float32), bundle="abc", confidence=0.41, drift=True)
    base.update(kw)
    return Sample(**base)


def test_json_round_trip_and_label_rules():
    s = _sample()
    assert s.teacher_label == 1 and s.label == 1
    assert s.uncertainty == pytest.approx(0.3)
    page = SamplePage([s, _sample(id=4, human_label=2)], next_after=4)
    back = SamplePage.from_json(page.to_json())
    assert back.next_after == 4
    a, b = back.samples
    np.testing.assert_array_equal(a.input, s.input)
    assert a.input.dtype == np.float32 and a.device == "dev-1" and a.drift is True and a.confidence == pytest.approx(0.41)
    assert b.human_label == 2 and b.label == 2 and b.teacher_label == 1


def test_from_row_reads_the_table_columns():
    s = Sample.from_row({"id": 9, "device_id": "d", "bundle": "v2", "received": 5.0,
                         "input": encode_tensor(np.ones((1, 4), np.float32)),
                         "teacher_probs": encode_tensor(np.array([0.2, 0.8], np.float32)),
                         "teacher_label": None, "confidence": None, "drift": None, "flagged": 1, "human_label": None})
    assert s.device == "d" and s.teacher_label == 1 and s.flagged is True and s.drift is None


@pytest.mark.parametrize("patch, field", [
    ({"input": "not base64!!"}, "input"),
    ({"input": "AAAA"}, "input"),
    ({"teacher_probs": "x"}, "teacher_probs"),
    ({"teacher_probs": [0.5, float("nan")]}, "teacher_probs"),
    ({"human_label": 7}, "human_label"),
    ({"human_label": True}, "human_label"),
    ({"confidence": "high"}, "confidence"),
    ({"device": None}, "device"),
    ({"id": "3"}, "id"),
])
def test_bad_records_name_the_field(patch, field):
    d = _sample().to_json()
    d.update(patch)
    with pytest.raises(SampleError, match=field):
        Sample.from_json(d)


def test_bad_pages():
    for bad in (None, [], {"schema": 2, "samples": []}, {"schema": 1, "samples": {}}):
        with pytest.raises(SampleError):
            SamplePage.from_json(bad)
