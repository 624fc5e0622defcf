"""The layout shows the pipeline: one package per stage, no import cycles, code that reads in one
sitting. docs/architecture.md draws the same picture for people.

These are checked on the source (``ast``), so they hold for function-level imports too: a
cycle hidden inside a function still means two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "service"
ROOT = PACKAGE.parent

# What every stage may use; everything else lives in the package named for its stage.
SHARED = {"__init__.py", "errors.py", "suggest.py", "digest.py", "stats.py"}
# The stage packages, lowest first: a package imports only those before it (docs/architecture.md).
ORDER = (
    "spec", "storage", "outputs", "backbones", "data", "train", "cost", "run", "search", "k8s",
    "report", "cli",
)  # fmt: skip
STAGES = set(ORDER)
# The imports against ORDER that stay, by importing module and imported package, each with its
# reason; docs/architecture.md lists the same. A new one needs a reason here, or a move.
UPWARD = {
    ("service.spec.sections", "train"): "the recipe names a spec accepts are train's registry "
    "(recipes.py is data; torch only inside its optimizer functions)",
    ("service.spec.study", "train"): "a Study's effective protocol fills recipe defaults from "
    "the same registry",
    ("service.storage.fetch", "data"): "a fetched dataset is checked by the one owner of the "
    "formats (image suffixes, the packed manifest, archive limits)",
    ("service.cost.budget", "search"): "a search Study is budgeted by its plan's epochs, not "
    "the grid's (search.plan is arithmetic on the spec: no torch, no I/O)",
    ("service.run.pack", "search"): "a packed index is the worker's composition root for its "
    "cells: a search rung's pack runs its candidates in it",
    ("service.run.pack", "k8s"): "a packed rung's cells are picked from the Job's completion "
    "index, like the worker's",
    ("service.run.worker", "search"): "the worker is the pod's composition root: a search "
    "driver or a rung cell runs in it",
    ("service.run.worker", "k8s"): "the worker is the pod's composition root: a rung cell is "
    "picked from the Job's completion index",
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
REASON = "Long because"  # a function over the limit says why in its docstring


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module an import of ``name`` loads (``service.spec.Study`` -> ``service.spec``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Every service module ``path`` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {t for n in names if n.startswith("service") and (t := _target(n))}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_top_level_holds_only_shared_vocabulary():
    loose = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"} - SHARED
    assert not loose, f"modules at service/ top level that belong to a stage: {sorted(loose)}"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == STAGES, f"stage packages differ from the documented ones: {packages}"


def test_docs_architecture_names_every_stage_package():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [s for s in sorted(STAGES) if f"`{s}/`" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_no_import_cycle_between_modules_function_level_imports_included():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 100, "the import graph came out implausibly small"
    assert _cycles(graph) == []


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


def _upward_imports() -> dict[tuple[str, str], list[str]]:
    """(importing module, imported package) -> the modules it imports from a later stage."""
    rank = {s: i for i, s in enumerate(ORDER)}
    found: dict[tuple[str, str], list[str]] = {}
    for name, path in MODULES.items():
        here = _stage(name)
        for target in sorted(_imports(path)):
            there = _stage(target)
            if here and there and rank[there] > rank[here]:
                found.setdefault((name, there), []).append(target)
    return found


def test_a_stage_imports_only_earlier_stages_function_level_imports_included():
    """Package-level layering: no package cycle hides behind acyclic modules. Each import of a
    later stage is either moved or listed in UPWARD with its reason."""
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    packages = {_stage(m) for m in graph} - {None}
    assert packages == STAGES, f"stage packages missing from ORDER: {packages ^ STAGES}"
    found = _upward_imports()
    unlisted = {k: v for k, v in found.items() if k not in UPWARD}
    assert not unlisted, f"imports of a later stage (move them, or list the reason): {unlisted}"
    stale = sorted(set(UPWARD) - set(found))
    assert not stale, f"UPWARD lists imports that are gone: {stale}"


def test_docs_architecture_states_the_order_and_every_upward_import():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert " → ".join(f"`{s}/`" for s in ORDER) in text, "docs/architecture.md: the stage order"
    missing = [f"{m} -> {p}/" for m, p in UPWARD if f"`{m}` → `{p}/`" not in text]
    assert not missing, f"docs/architecture.md does not list: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_reads_in_one_sitting(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines (limit {MAX_MODULE_LINES})"


def test_no_function_is_long_without_saying_why():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and REASON not in (ast.get_docstring(node) or ""):
                long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them or add '{REASON} ...' to the "
        f"docstring: {long}"
    )


def test_no_import_guard_for_a_module_that_always_ships():
    """``try: from service.x import y / except ImportError`` hides a real error in a module we
    ship; only optional third-party packages (the wavemix extra) are guarded."""
    guarded = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if not catches & {"ImportError", "ModuleNotFoundError"}:
                continue
            inner = {i for stmt in node.body for i in _imports_in(stmt)}
            if inner:
                guarded.append(f"{name}: {sorted(inner)}")
    assert not guarded, f"ImportError guards around service modules: {guarded}"


def _imports_in(stmt: ast.stmt) -> set[str]:
    return {
        n.module
        for n in ast.walk(stmt)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("service")
    } | {
        a.name
        for n in ast.walk(stmt)
        if isinstance(n, ast.Import)
        for a in n.names
        if a.name.startswith("service")
    }
