"""The typed manifest: one reader that validates types, upgrades old schemas, and survives any input."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecore.bundle import open_bundle, read_manifest
from edgecore.errors import BundleTrustError
from edgecore.manifest import SCHEMA_VERSION, Manifest, ManifestError

from .conftest import make_manifest


def _good() -> dict:
    m = make_manifest().to_dict()
    m["files"] = {"model.onnx": {"size": 3, "sha256": "a" * 64}, "drift_reference.json": {"size": 2, "sha256": "b" * 64}}
    return m


def test_round_trip_is_exact():
    d = _good()
    m = Manifest.from_dict(d)
    assert m.to_dict() == d
    assert m.schema_version == SCHEMA_VERSION and m.routing.threshold == 0.7 and m.input.sample_shape == (1, 8, 8)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("routing", "threshold"), "abc", "manifest.routing.threshold: expected number, got str 'abc'"),
    (("routing", "temperature"), -1.0, "manifest.routing.temperature: must be > 0"),
    (("routing", "measure"), "vibes", "unknown measure 'vibes'"),
    (("input", "shape"), [None, "8", 8], "manifest.input.shape: expected [batch, positive ints...]"),
    (("input", "shape"), [None, 2**40], "manifest.input.shape"),
    (("input", "preprocess", "std"), [0.0], "std non-zero"),
    (("output", "labels"), [1, 2], "manifest.output.labels: expected a non-empty list of strings"),
    (("precision",), "int4", "unknown precision 'int4'"),
    (("target",), 7, "manifest.target: expected str, got int 7"),
    (("files", "model.onnx", "size"), "3", "manifest.files['model.onnx'].size: expected number"),
    (("files", "model.onnx", "sha256"), "xyz", "sha256 64 lowercase hex digits"),
    (("artifact", "main"), "other.onnx", "manifest.artifact.main: 'other.onnx' is not listed in files"),
    (("drift_reference",), "nowhere.json", "manifest.drift_reference: 'nowhere.json' is not listed"),
    (("metrics",), [1], "manifest.metrics: expected dict, got list"),
    (("routing", "threshold"), True, "manifest.routing.threshold: expected number, got bool"),
    (("task", "name"), "segment", "manifest.task.name: unknown task 'segment'"),
    (("task", "name"), 3, "manifest.task.name: expected str, got int 3"),
    (("task", "params"), {"iou": 0.5}, "manifest.task.params: unknown parameter 'iou'"),
    (("task",), "classify", "manifest.task: expected dict, got str"),
])
def test_wrong_types_are_named(path, value, message):
    d = _good()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(d)
    assert message in str(e.value)


def test_every_problem_is_reported_at_once():
    d = _good()
    d["target"] = 1
    d["routing"]["threshold"] = "x"
    del d["model"]
    msg = str(pytest.raises(ManifestError, Manifest.from_dict, d).value)
    assert "manifest.target" in msg and "manifest.routing.threshold" in msg and "manifest.model: missing" in msg


def test_unknown_and_future_schema_refused():
    for v in (0, SCHEMA_VERSION + 1, 99, "2", None, True):
        d = _good()
        d["schema_version"] = v
        with pytest.raises(ManifestError, match="unknown bundle schema version"):
            Manifest.from_dict(d)


def test_schema_1_is_upgraded():
    """A round-1 manifest (no drift_reference key, a fixed file name) reads as the current schema."""
    d = _good()
    d["schema_version"] = 1
    del d["drift_reference"]
    m = Manifest.from_dict(d)
    assert m.schema_version == SCHEMA_VERSION and m.drift_reference == "drift_reference.json"
    del d["files"]["drift_reference.json"]
    assert Manifest.from_dict(d).drift_reference is None


def test_bench_bundles_without_routing_read():
    d = _good()
    d["routing"] = {}
    assert Manifest.from_dict(d).routing is None


def test_manifest_file_errors(bundle_dir):
    (bundle_dir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleTrustError, match="not a JSON object"):
        read_manifest(bundle_dir)
    (bundle_dir / "manifest.json").write_text("{" * 100000)
    with pytest.raises(BundleTrustError, match="unreadable manifest"):
        read_manifest(bundle_dir)
    (bundle_dir / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(BundleTrustError, match="unreadable manifest"):
        open_bundle(bundle_dir)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


def _mutations():
    """A good manifest with one node replaced by arbitrary JSON (the class: any field, any type)."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))

    walk(_good(), ())
    return st.tuples(st.sampled_from(paths[1:]), _json)


def _apply(path, value):
    d = _good()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzz_reader_either_reads_or_names_the_field(mut):
    """Whatever one field holds, the reader returns a valid Manifest or raises ManifestError; nothing else."""
    d = _apply(*mut)
    try:
        m = Manifest.from_dict(json.loads(json.dumps(d)))
    except ManifestError:
        return
    assert Manifest.from_dict(m.to_dict()) == m  # what it accepted, it writes back readable


@settings(max_examples=200, deadline=None)
@given(_json)
def test_fuzz_reader_on_arbitrary_json(doc):
    try:
        Manifest.from_dict(doc)
    except ManifestError:
        pass


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzz_reader_long(mut):
    test_fuzz_reader_either_reads_or_names_the_field.hypothesis.inner_test(mut)


def test_schema_2_bundles_read_as_classification():
    d = _good()
    d["schema_version"] = 2
    del d["task"]
    m = Manifest.from_dict(d)
    assert m.schema_version == SCHEMA_VERSION and m.task.name == "classify" and dict(m.task.params) == {}


def test_task_is_required_in_the_current_schema():
    d = _good()
    del d["task"]
    with pytest.raises(ManifestError, match="manifest.task: missing"):
        Manifest.from_dict(d)


def test_a_third_party_task_is_found_through_its_entry_point(monkeypatch):
    from importlib import metadata

    from edgecore import plugins
    from edgecore.tasks import ENTRY_POINT_GROUP, get_task, task_names

    ep = metadata.EntryPoint(name="rank", value="edgecore.tasks.classify:Classify", group=ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [ep] if kw.get("group") == ENTRY_POINT_GROUP else real(**kw))
    plugins._installed.cache_clear()
    try:
        assert "rank" in task_names() and get_task("rank").name == "classify"
    finally:
        plugins._installed.cache_clear()


def test_a_manifest_names_its_resize_mode_or_reads_as_stretch():
    """How an image file becomes the input (`InputSpec.resize`): written only when not the default, so every
    other model's manifest reads as before; an unknown mode is one clear error."""
    from edgecore.spec import InputSpec

    d = _good()
    assert "resize" not in d["input"]["preprocess"] and Manifest.from_dict(d).input.resize == "stretch"
    d["input"]["preprocess"].update(resize="letterbox", pad_value=0.0)
    spec = Manifest.from_dict(d).input
    assert (spec.resize, spec.pad_value) == ("letterbox", 0.0) and Manifest.from_dict(d).to_dict() == d
    assert InputSpec.from_dict(spec.to_dict()) == spec
    d["input"]["preprocess"]["resize"] = "squash"
    with pytest.raises(ManifestError, match=r"manifest.input.preprocess.resize: unknown resize 'squash'"):
        Manifest.from_dict(d)
