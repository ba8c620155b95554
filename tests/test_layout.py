"""The house: imports flow one way between histoflow's packages, with no circle; the package installs from a wheel
with its configs, and its commands run from outside the checkout."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "histoflow"
# Each package and what it may import from histoflow (besides itself): the data flow, lowest first.
BELOW = {
    "common": set(),
    "data": {"common"},
    "models": {"common"},
    "slides": {"common", "data"},
    "evaluation": {"common", "data"},
    "features": {"common", "data", "models", "slides"},
    "training": {"common", "data", "models", "features", "evaluation"},
    "inference": {"common", "data", "models", "features", "evaluation", "slides", "training"},
    "deployment": {"common", "data", "models", "features", "evaluation", "slides", "training", "inference"},
    "viewer": {"common", "data", "models", "features", "evaluation", "slides", "training", "inference", "deployment"},
    "commands": {"common", "data", "models", "features", "evaluation", "slides", "training", "inference", "deployment",
                 "viewer"},
}
# Test-only helpers (tests, benchmarks, tools share them): above everything, they may import any stage; no stage
# imports them.
BELOW["testing"] = set(BELOW)
TOP = {"__init__": set(), "cli": set(), "__main__": {"cli"}}  # top-level modules: cli imports commands by name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported histoflow module or name, line, inside a function) of every import statement of a file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import; histoflow imports absolutely"
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [(n, node.lineno, id(node) in inner) for n in names if n.split(".")[0] == "histoflow"]
    return found


def graph() -> dict[str, dict[str, int]]:
    """Module -> {histoflow module it imports: line}, over every module of the package."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        for target, line, _ in imports(path):
            while target and target not in files:  # `from histoflow.models import X`: X is a name, not a module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(name, {}).setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_walk_finds_a_circle() -> None:
    """The check itself: a two-module loop and a three-module loop are found, a chain is not."""
    assert cycles({"a": {"b": 1}, "b": {"a": 1}, "c": {"a": 1}}) == [["a", "b"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}}) == []


def test_imports_flow_one_way_between_packages() -> None:
    """data imports no model (nor anything above it); each package only from the packages below it."""
    wrong = []
    for module, targets in graph().items():
        own = package(module)
        allowed = BELOW.get(own, TOP.get(own))
        assert allowed is not None, (f"{module}: a package the layout does not know; "
                                     "add it to BELOW (and docs/layout.md)")
        for target, line in targets.items():
            if package(target) != own and package(target) not in allowed:
                wrong.append(f"{module}:{line} imports {target}")
    assert wrong == []
    assert "models" not in BELOW["data"] and "features" not in BELOW["data"]


def test_no_stage_imports_the_test_helpers() -> None:
    """histoflow.testing holds what only tests, benchmarks and tools use; a stage importing it ships test code."""
    users = [f"{module}:{line}" for module, targets in graph().items() if package(module) != "testing"
             for target, line in targets.items() if package(target) == "testing"]
    assert users == []
    assert all("testing" not in allowed for name, allowed in BELOW.items() if name != "testing")


def test_no_histoflow_import_inside_a_function() -> None:
    """A function-level import of histoflow dodges a circle or hides a dependency; heavy third-party imports
    (matplotlib, scikit-learn, timm) may wait for their first use, histoflow's own never. The one exception: a
    command imports its stage once Hydra has composed the config, so that --help and a config error answer in a
    second rather than after Lightning's imports."""
    late = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in PACKAGE.rglob("*.py")
            for name, line, inside in imports(p) if inside and p.parent.name != "commands"]
    assert late == []


def test_every_package_is_in_the_layout() -> None:
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert found == set(BELOW)


@pytest.mark.slow
def test_a_wheel_installs_and_its_commands_run_outside_the_checkout(tmp_path: Path) -> None:
    """Built as a wheel (not editable), installed into a bare folder: the configs are inside it and `histoflow
    train --help` composes train.yaml from there, started far from the checkout."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: setuptools builds in the tree
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, source)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, timeout=300)
    wheel = next(wheels.glob("histoflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "histoflow/conf/train.yaml" in names and "histoflow/conf/data/lymphoma.yaml" in names
    viewer = "histoflow/viewer/static/openseadragon/"  # the viewer's OpenSeadragon, its licence and its pages' scripts
    assert {viewer + "openseadragon.min.js", viewer + "LICENSE.txt", viewer + "images/home_rest.png",
            "histoflow/viewer/static/slide.js", "histoflow/conf/view.yaml"} <= set(names)
    assert not any(n.startswith(("tools/", "tests/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    env.pop("HISTOFLOW_DATA", None)
    run = subprocess.run([sys.executable, "-m", "histoflow", "train", "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "== Configuration groups ==" in run.stdout and "model: " in run.stdout
    where = subprocess.run([sys.executable, "-c", "import histoflow; print(histoflow.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(target)), where.stdout  # the wheel's copy ran, not the checkout's
