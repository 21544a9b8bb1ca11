"""The import graph runs one way: foundation <- targets <- calibration <- toolchain, and so on.

Every import in every production module is parsed (function-level ones too,
since a lazy import is still a dependency); any edge from a package to one it
may not import fails, naming the file and line. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "edgecore": set(),
    "targets": {"edgecore"},
    "calibration": {"edgecore", "targets"},
    "device_agent": {"edgecore", "targets"},
    "toolchain": {"edgecore", "targets", "calibration"},
    "cloud_gateway": {"edgecore", "targets", "calibration", "device_agent", "toolchain"},
    "hw_bench": {"edgecore", "targets", "calibration", "device_agent", "toolchain"},
    "edge_demo": {"edgecore", "targets", "calibration", "device_agent", "toolchain", "cloud_gateway", "hw_bench"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """``{(from package, to package): ["file:line", ...]}`` over the project's packages."""
    found: dict[tuple[str, str], list[str]] = {}
    for pkg in ALLOWED:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for line, mod in _imports(f):
                if mod in ALLOWED and mod != pkg:
                    found.setdefault((pkg, mod), []).append(f"{f.relative_to(ROOT)}:{line}")
    return found


def test_every_package_is_layered():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(ALLOWED), f"packages with no layer: {sorted(on_disk - set(ALLOWED))}"


# Edges that still point up, each with the slice of the redesign that removes it.
# The list may only shrink: a new entry needs a reason in the redesign note.
KNOWN_UP: dict[tuple[str, str], str] = {}


def test_no_import_points_up():
    bad = [
        f"{a} -> {b}: {', '.join(where)}"
        for (a, b), where in sorted(edges().items())
        if b not in ALLOWED[a] and (a, b) not in KNOWN_UP
    ]
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_the_foundation_imports_nothing_heavy():
    heavy = {"torch", "tensorflow", "onnx", "onnxruntime", "openvino", "paho", "flask", "sqlalchemy", "rich"}
    found = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in sorted((ROOT / "edgecore").rglob("*.py"))
        for line, mod in _imports(f)
        if mod in heavy
    ]
    # clikit's rich import is lazy and only for terminals; everything else must be absent
    assert [x for x in found if "clikit.py" not in x] == []


if __name__ == "__main__":  # the before/after table in the redesign note
    for (a, b), where in sorted(edges().items()):
        print(f"{a:>14} -> {b:<14} {len(where):3d}")


# names with one home in the foundation, imported from there only (not through a package that imports them)
ONE_HOME: dict[str, str] = {"InputSpec": "edgecore.spec", "Precision": "edgecore.spec"}


def imported_elsewhere(path: Path, root: Path = ROOT) -> list[str]:
    """``"file:line name from module"`` for each ONE_HOME name ``path`` imports from another module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            bad += [f"{path.relative_to(root)}:{node.lineno} {a.name} from {module}" for a in node.names
                    if a.name in ONE_HOME and module != ONE_HOME[a.name]]
    return bad


def test_the_spec_types_are_imported_from_their_one_home(tmp_path):
    files = [f for pkg in [*ALLOWED, "tests"] for f in sorted((ROOT / pkg).rglob("*.py"))]
    bad = [b for f in files for b in imported_elsewhere(f)]
    assert not bad, "import these from edgecore.spec:\n" + "\n".join(bad)
    # the check sees a re-export when there is one
    (tmp_path / "m.py").write_text("from targets.base import InputSpec\nfrom edgecore.spec import Precision\n")
    assert [b.split(" ", 1)[1] for b in imported_elsewhere(tmp_path / "m.py", tmp_path)] == [
        "InputSpec from targets.base"]


# constructors with one caller in production code: {name: the files allowed to call it}
ONE_CALLER: dict[str, set[str]] = {
    "Manifest": {"edgecore/manifest.py", "toolchain/bundle.py"},  # the reader; the one assembler (manifest_for)
    "ArtifactInfo": {"edgecore/manifest.py", "targets/base.py"},  # the reader; Artifact.info
}


def constructed_elsewhere(path: Path, rel: str) -> list[str]:
    """``"file:line Name(...)"`` for each call of a ONE_CALLER name outside the files allowed to make it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{rel}:{node.lineno} {node.func.id}(...)" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ONE_CALLER
            and rel not in ONE_CALLER[node.func.id]]


def test_one_place_assembles_a_manifest_and_one_describes_an_artifact(tmp_path):
    bad = [b for pkg in ALLOWED for f in sorted((ROOT / pkg).rglob("*.py"))
           for b in constructed_elsewhere(f, f.relative_to(ROOT).as_posix())]
    assert not bad, "use toolchain.bundle.manifest_for / Artifact.info:\n" + "\n".join(bad)
    (tmp_path / "m.py").write_text("m = Manifest(model=None)\ni = ArtifactInfo(main='x', runtime='y')\n")
    assert constructed_elsewhere(tmp_path / "m.py", "hw_bench/models.py") == [
        "hw_bench/models.py:1 Manifest(...)", "hw_bench/models.py:2 ArtifactInfo(...)"]
