"""The package's shape: imports go down the layers only (lazy imports included), no module imports back up into a
cycle, no function is longer than 60 lines, and library code reads nothing outside the repository. The layers and
who owns what are drawn in docs/design.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "openowl"
# Lowest first; a module may import modules of its own layer or of a lower one. train and eval sit beside infer.
LAYERS = [
    {"openowl.constants", "openowl.config", "openowl.files"},
    {"openowl.prompts", "openowl.processing", "openowl.video", "openowl.data"},
    {"openowl.model"},
    {"openowl.checkpoint", "openowl.convert"},
    {"openowl.loading", "openowl.owl_small"},
    {"openowl.infer", "openowl.train", "openowl.eval"},
    {"openowl.serve", "openowl.chat", "openowl.vllm"},
    {"openowl.cli", "openowl.__main__"},
]
# The loader's clients below it: each `from_pretrained` keeps one lazy edge into `openowl.loading`.
LAZY_LOADER_EDGES = {("openowl.model.owl", "openowl.loading"), ("openowl.processing", "openowl.loading")}
SIBLINGS_APART = [("openowl.train", "openowl.eval"), ("openowl.eval", "openowl.train"),
                  ("openowl.train", "openowl.infer")]  # fmt: skip
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The openowl module an imported name lives in (`openowl.loading` for `from openowl import loading`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, tree: ast.Module) -> set[str]:
    found = set()
    package = module if tree is MODULES.get(module) and _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):  # every import, at the top or inside a function (lazy)
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b is a.b.x
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("openowl") else None
            own_package = target != "openowl" and module.startswith(f"{target}.")  # e.g. owl_small.cache -> owl_small
            if target and target != module and not own_package:
                found.add(target)
    return found


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


GRAPH = {module: _imports(module, tree) for module, tree in MODULES.items()}


def _layer(module: str) -> int:
    for level, roots in enumerate(LAYERS):
        if any(module == root or module.startswith(root + ".") for root in roots):
            return level
    if module == "openowl":
        return len(LAYERS)  # the package's __init__ re-exports the public API, for users: no module imports it
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py (and docs/design.md): place it")


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_go_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(module) and (module, target) not in LAZY_LOADER_EDGES
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles_lazy_imports_included():
    graph = {m: {t for t in ts if (m, t) not in LAZY_LOADER_EDGES and t != "openowl"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_lazy_loader_edges_are_the_only_ones_upward():
    for module, target in LAZY_LOADER_EDGES:
        assert target in GRAPH[module], f"{module} no longer imports {target}: drop the exception"


@pytest.mark.parametrize("importer, imported", SIBLINGS_APART)
def test_siblings_do_not_import_each_other(importer, imported):
    offenders = [m for m, ts in GRAPH.items() if m.startswith(importer) and any(t.startswith(imported) for t in ts)]
    assert not offenders, f"{offenders} import {imported}"


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_library_code_reads_nothing_outside_the_repository():
    """No path built from the package's location reaches above the repository, and no module names the
    development machines' `shared` folder."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if '"shared"' in text or "'shared'" in text or "/shared/" in text or ".parents[2]" in text:
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert not offenders, offenders
