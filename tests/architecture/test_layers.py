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


# Import edges that point up, each with its reason (docs/architecture.md). There are none; the list may only
# shrink, and a new entry needs its reason in docs/architecture.md too.
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
    """Top-level packages ``path`` imports when it is imported (`_on_import`: not inside a function or class
    body, nor under ``if TYPE_CHECKING``)."""
    out: set[str] = set()
    for node in _on_import(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
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


if __name__ == "__main__":  # the import-edge table (docs/architecture.md): python -m tests.architecture.test_layers
    for (a, b), where in sorted(edges().items()):
        print(f"{a:>14} -> {b:<14} {len(where):3d}")


# The entry-point groups: the edges that are not imports. Each names the package that loads the group at run
# time (through importlib.metadata, never an import) and why; docs/architecture.md shows the same table.
ENTRY_POINT_GROUPS: dict[str, tuple[str, str]] = {
    "edge_toolchain.commands": ("toolchain", "the demo adds `toolchain demo` from above the toolchain"),
    "edge_toolchain.agent_commands": ("device_agent", "commands a device runs from other packages: hw-bench's "
                                      "`bench` job (its device half: edgecore, targets and hw_bench only)"),
    "edge_toolchain.latency_devices": ("toolchain", "hw-bench measures latency-search candidates on a fleet "
                                       "device, for the pruning pass"),
    "edge_toolchain.targets": ("targets", "third-party targets"),
    "edge_toolchain.tasks": ("edgecore", "third-party tasks (contract half)"),
    "edge_toolchain.train_tasks": ("toolchain", "third-party tasks (training half)"),
}


def _declared_entry_points() -> dict[str, dict[str, str]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {group: dict(eps) for group, eps in project.get("entry-points", {}).items()}


def _loaded_groups() -> dict[str, set[str]]:
    """{group: the packages whose code names it} (a string constant in a production module)."""
    found: dict[str, set[str]] = {}
    for pkg in ALLOWED:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ENTRY_POINT_GROUPS:
                    found.setdefault(node.value, set()).add(pkg)
    return found


def test_every_entry_point_group_is_on_the_map():
    declared = _declared_entry_points()
    assert set(declared) <= set(ENTRY_POINT_GROUPS), f"undocumented groups: {set(declared) - set(ENTRY_POINT_GROUPS)}"
    loaded = _loaded_groups()
    for group, (consumer, _why) in ENTRY_POINT_GROUPS.items():
        assert loaded.get(group) == {consumer}, f"{group}: loaded by {loaded.get(group)}, the map says {consumer}"
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [g for g in ENTRY_POINT_GROUPS if f"`{g}`" not in doc]
    assert not missing, f"docs/architecture.md does not show {missing}"


def _on_import(tree: ast.Module) -> list[ast.stmt]:
    """The statements that run on import: the module's body, into ``try``/``if`` blocks but not
    ``if TYPE_CHECKING`` or function and class bodies."""
    out: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def _closure(module: str) -> set[str]:
    """The project modules importing ``module`` loads, transitively (module-level imports: a lazy import inside
    a function loads nothing until that function runs)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _on_import(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                mods = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            todo += [m for m in mods if m.split(".")[0] in ALLOWED]
    return {m for m in seen if (ROOT / (m.replace(".", "/") + ".py")).exists()
            or (ROOT / m.replace(".", "/") / "__init__.py").exists()}


def test_what_devices_load_through_entry_points_stays_on_the_device_side():
    """A device's agent loads its commands' modules: only the device side (edgecore, targets, device_agent) and
    the provider's own package may be in their closure: never the toolchain, calibration or the gateway."""
    device_side = {"edgecore", "targets", "device_agent"}
    for name, value in _declared_entry_points().get("edge_toolchain.agent_commands", {}).items():
        module = value.split(":")[0]
        own = module.split(".")[0]
        outside = sorted(m for m in _closure(module) if m.split(".")[0] not in device_side | {own})
        assert not outside, f"agent command {name} ({module}) loads {outside} on devices"
    # the closure follows module-level imports across packages and stops at lazy ones
    assert {"toolchain.config", "toolchain.section", "edgecore.errors"} <= _closure("toolchain.bundle")
    assert "calibration.routing" not in _closure("toolchain.bundle")  # imported inside _routing only


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
