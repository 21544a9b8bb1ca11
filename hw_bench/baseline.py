"""The PyTorch eager fp32 baseline (cloud side only; torch is imported lazily).

``SPEC`` is ``[MODEL=]SOURCE`` where SOURCE is a run directory (its fp32
student, `RunDir.load_student`), a ``python:module:function`` factory
returning an ``nn.Module``, or a ``.pt`` file holding a whole pickled module
(what ``hw-bench models`` writes; only load files you made). ``MODEL`` pairs it
with the bundles whose manifest has that model name.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edgecore.errors import BenchError
from edgecore.spec import InputSpec

from .bench import Contender


def _load_module(source: str) -> tuple[Any, str | None]:
    """(nn.Module in eval mode, model name if the source knows it)."""
    import torch

    if source.startswith("python:"):
        mod_name, _, fn = source[len("python:"):].partition(":")
        if not mod_name or not fn:
            raise BenchError(f"baseline {source!r}: want python:module:function")
        try:
            factory = getattr(importlib.import_module(mod_name), fn)
        except (ImportError, AttributeError) as e:
            raise BenchError(f"baseline {source!r}: cannot import ({e})") from e
        try:
            module = factory()
        except Exception as e:
            raise BenchError(f"baseline {source!r}: the factory failed ({e})") from e
        if not isinstance(module, torch.nn.Module):
            raise BenchError(f"baseline {source!r}: the factory returned a {type(module).__name__}, not a torch module")
        return module.eval(), None
    p = Path(source)
    if p.is_dir():
        from toolchain.rundir import RunDir

        run = RunDir(p)
        return run.load_student().eval(), run.model_source().name
    if p.is_file() and p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            raise BenchError(f"baseline {p}: cannot load ({e})") from e
        if isinstance(obj, dict) and "module" in obj:
            return obj["module"].eval(), obj.get("name")
        if isinstance(obj, torch.nn.Module):
            return obj.eval(), None
        raise BenchError(f"baseline {p}: holds a {type(obj).__name__}, not a torch module")
    raise BenchError(f"baseline {source!r}: not a run directory, .pt file or python:module:function")


def parse_spec(spec: str) -> tuple[str | None, str]:
    name, eq, source = spec.partition("=")
    if eq and not name.startswith("python:") and "/" not in name:
        return name, source
    return None, spec


def torch_contender(spec: str, *, models: dict[str, InputSpec], threads: int | None) -> Contender:
    """A baseline contender paired with one of ``models`` (model name -> its input spec)."""
    import torch

    name, source = parse_spec(spec)
    module, known = _load_module(source)
    name = name or known
    if name is None:
        if len(models) != 1:
            raise BenchError(f"baseline {spec!r}: say which model it is (MODEL=SOURCE); models: {', '.join(models)}")
        name = next(iter(models))
    if name not in models:
        raise BenchError(f"baseline for model {name!r}, but no bundle has that model (bundles: {', '.join(models)})")
    if threads:
        torch.set_num_threads(threads)

    def run(batch: Any) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return Contender(
        name=f"{name} pytorch/fp32",
        model=name,
        run=run,
        input_spec=models[name],
        is_baseline=True,
        meta={
            "kind": "pytorch",
            "model": name,
            "target": "pytorch",
            "precision": "fp32",
            "runtime": "torch",
            "runtime_version": torch.__version__,
            "bundle_sha256": None,
            "size_bytes": int(sum(p.numel() * p.element_size() for p in module.parameters())),
            "threads": threads if threads else torch.get_num_threads(),
            "source": source,
        },
    )
