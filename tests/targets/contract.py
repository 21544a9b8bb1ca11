"""The contract every target passes: one template, subclassed once per target.

A subclass sets ``target_name`` (and may tune ``min_agreement``). The meta-test
in ``test_meta.py`` fails when a registered target has no subclass here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from edgecore.errors import UnknownTargetError
from edgecore.spec import Precision
from targets import Target, get_target, parse_precision, target_names

ROOT = Path(__file__).resolve().parents[2]


class TargetContract:
    target_name: ClassVar[str]
    # top-1 agreement with the PyTorch model on the tiny digits test split
    min_agreement: ClassVar[dict[str, float]] = {"fp32": 0.995, "fp16": 0.99, "int8": 0.95}
    use_qdq_source: ClassVar[bool] = False  # build int8 from the (QAT-like) QDQ graph instead of PTQ

    @pytest.fixture(scope="class")
    def target(self) -> Target:
        return get_target(self.target_name)

    @pytest.fixture(scope="class")
    def built(self, tiny_source: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        return {}

    def _build(self, target: Target, precision: Precision, tiny_source: Any, built: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
        if precision.value not in built:
            ok, why = target.build_available()
            if not ok:
                pytest.skip(f"{target.name} cannot build here: {why}")
            out = tmp_path_factory.mktemp(f"{target.name}-{precision.value}")
            src = tiny_source.qdq_source if self.use_qdq_source else tiny_source.source
            rep = tiny_source.rep if precision is Precision.INT8 else None
            built[precision.value] = (out, target.build(src, precision, rep, out))
        return built[precision.value]

    # ------------------------------------------------------------------ contract
    def test_registered_under_its_name(self, target: Target) -> None:
        assert self.target_name in target_names()
        assert target.name == self.target_name
        assert target.precisions and all(isinstance(p, Precision) for p in target.precisions)
        assert target.runtime and target.install_hint

    def test_availability_says_why(self, target: Target) -> None:
        for ok, why in (target.available(), target.build_available()):
            assert isinstance(ok, bool)
            assert isinstance(why, str) and why.strip()

    def test_unsupported_precision_is_a_clear_error(self, target: Target) -> None:
        with pytest.raises(UnknownTargetError, match="unknown precision 'fp64'"):
            parse_precision(target, "fp64")
        for p in Precision:
            if p not in target.precisions:
                with pytest.raises(UnknownTargetError, match=f"does not support {p.value}"):
                    parse_precision(target, p.value)

    @pytest.mark.parametrize("precision", [p.value for p in Precision])
    def test_build_load_run(self, precision: str, target: Target, tiny_source: Any, built: dict[str, Any],
                            tmp_path_factory: pytest.TempPathFactory) -> None:
        p = Precision(precision)
        if p not in target.precisions:
            pytest.skip(f"{target.name} has no {precision}")
        out, art = self._build(target, p, tiny_source, built, tmp_path_factory)
        assert art.target == target.name and art.precision is p and art.runtime == target.runtime
        for name in art.files:
            assert (out / name).exists(), f"{name} listed but not written"
        assert not [f for f in out.iterdir() if f.name not in art.files], "build left stray files"
        ok, why = target.available()
        if not ok:
            pytest.skip(f"{target.name} artifacts cannot run here: {why}")
        info = art.info()
        runner = target.load(out, info, tiny_source.source.input_spec, threads=1)
        logits = np.asarray(runner.run(tiny_source.x_test))
        assert logits.shape == tiny_source.ref_logits.shape
        assert np.all(np.isfinite(logits))
        agree = float((logits.argmax(1) == tiny_source.ref_logits.argmax(1)).mean())
        assert agree >= self.min_agreement[precision], f"{target.name} {precision}: agreement {agree:.4f}"
        one = np.asarray(runner.run(tiny_source.x_test[:1]))  # batch size may change between calls
        np.testing.assert_allclose(one, logits[:1], rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("precision", [p.value for p in Precision])
    def test_one_input_answers_as_the_batch_path(self, precision: str, target: Target, tiny_source: Any,
                                                 built: dict[str, Any],
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
        """The device's one-raw-input path (preprocessing folded in) gives the batch path's class and confidence."""
        from edgecore.confidence import confidence, row_scorer
        from targets import one_input

        p = Precision(precision)
        if p not in target.precisions:
            pytest.skip(f"{target.name} has no {precision}")
        out, art = self._build(target, p, tiny_source, built, tmp_path_factory)
        ok, why = target.available()
        if not ok:
            pytest.skip(f"{target.name} artifacts cannot run here: {why}")
        spec = tiny_source.source.input_spec
        info = art.info()
        runner = target.load(out, info, spec, threads=1)
        a, b = spec.affine()
        raw = ((tiny_source.x_test[:40] - b) / a).astype(np.float32)  # the raw inputs the test split came from
        ref = np.asarray(runner.run(spec.preprocess(raw)))
        ref_conf = confidence(ref, temperature=0.8)
        path = one_input(runner, spec)
        score = row_scorer("max_prob", 0.8, path.quant)
        got = [score(path.run(r)) for r in raw]
        tol = 0.02 if p is Precision.INT8 else 1e-4  # int8: the folded quantization may round an input value apart
        assert np.mean([g[0] == int(c) for g, c in zip(got, ref.argmax(1))]) >= 0.95
        assert np.abs(np.array([g[1] for g in got]) - ref_conf).max() <= tol
        runner.run(spec.preprocess(raw[:5]))  # a batch in between (a runner may resize for it)
        again = [score(path.run(r)) for r in raw[:10]]
        assert [g[0] for g in again] == [g[0] for g in got[:10]]
        assert [g[1] for g in again] == pytest.approx([g[1] for g in got[:10]], abs=1e-6)
        as64 = [score(path.run(r.astype(np.float64))) for r in raw[:10]]  # another dtype: the same answers
        assert [g[0] for g in as64] == [g[0] for g in got[:10]]
        assert np.abs(np.array([g[1] for g in as64]) - [g[1] for g in got[:10]]).max() <= tol

    def test_runner_is_torch_free(self, target: Target, tiny_source: Any, built: dict[str, Any],
                                  tmp_path_factory: pytest.TempPathFactory) -> None:
        """The device side loads and runs the artifact without importing torch or tensorflow."""
        p = target.precisions[0]
        out, art = self._build(target, p, tiny_source, built, tmp_path_factory)
        ok, why = target.available()
        if not ok:
            pytest.skip(f"{target.name} artifacts cannot run here: {why}")
        parts = {"main": art.main, "details": art.details, "input": tiny_source.source.input_spec.to_dict()}
        code = (
            "import json, sys, numpy as np\n"
            "from pathlib import Path\n"
            "from edgecore.manifest import ArtifactInfo\n"
            "from edgecore.spec import InputSpec\n"
            "from targets import get_target\n"
            f"d = json.loads({json.dumps(json.dumps(parts))})\n"
            f"r = get_target({target.name!r}).load(Path({str(out)!r}), ArtifactInfo(main=d['main'], runtime='', "
            "details=d['details']), InputSpec.from_dict(d['input']))\n"
            f"y = r.run(np.zeros((2, {', '.join(map(str, tiny_source.source.input_spec.sample_shape))}), np.float32))\n"
            "print(json.dumps(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules)))\n"
        )
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == []
