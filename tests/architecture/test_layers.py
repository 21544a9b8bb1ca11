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


HEAVY = {"torch", "tensorflow", "onnx", "onnxruntime", "openvino", "paho", "flask", "sqlalchemy", "rich"}
# the only heavy imports the foundation may make, each inside the functions that need it:
# clikit's rich (terminals only) and the MQTT link's paho (only clients that connect)
LAZY_OK = {("clikit.py", "rich"), ("mqtt.py", "paho")}


def _module_level(path: Path) -> set[str]:
    """Top-level packages imported at module level (not inside a function or class body)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def test_the_foundation_imports_nothing_heavy():
    found = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in sorted((ROOT / "edgecore").rglob("*.py"))
        for line, mod in _imports(f)
        if mod in HEAVY and (f.name, mod) not in LAZY_OK
    ]
    assert found == []
    eager = {f"{f.name}: {m}" for f in (ROOT / "edgecore").rglob("*.py") for m in _module_level(f) & HEAVY}
    assert eager == set(), "heavy imports at module level in the foundation (make them lazy)"


def test_importing_the_foundation_loads_no_heavy_package():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, edgecore\n"
            "for m in pkgutil.iter_modules(edgecore.__path__): importlib.import_module('edgecore.' + m.name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


if __name__ == "__main__":  # the before/after table in the redesign note
    for (a, b), where in sorted(edges().items()):
        print(f"{a:>14} -> {b:<14} {len(where):3d}")
