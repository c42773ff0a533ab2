"""The code's layout: no import cycle between the project's modules, no module over 550 lines,
and `model/` (the training code) imports no tracker. Read off the source with `ast`, so nothing
is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "ablations")
MAX_LINES = 550


def modules() -> dict[str, Path]:
    out = {"runner": ROOT / "runner.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, names: set[str]) -> set[str]:
    """The project modules `path` imports, at module level or inside a function (an import
    under `if TYPE_CHECKING:` does not run, so it is left out)."""
    found: set[str] = set()
    own = f"{path.parent.name}.{path.stem}" if path.parent != ROOT else path.stem

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {n for n in found if n in names and n != own}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's shortest witness, found from each module (small graphs)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(g):
        # breadth-first from start's imports back to start: the shortest cycle through it
        paths = {n: [start, n] for n in g[start]}
        frontier = list(paths)
        while frontier and start not in paths:
            nxt = []
            for node in frontier:
                for m in sorted(g[node]):
                    if m not in paths:
                        paths[m] = paths[node] + [m]
                        nxt.append(m)
            frontier = nxt
        if start in g[start]:
            paths[start] = [start, start]
        if start in paths and frozenset(paths[start]) not in seen:
            seen.add(frozenset(paths[start]))
            found.append(paths[start])
    return found


def test_the_graph_sees_imports_at_module_and_function_level():
    g = graph()
    assert "ablations.engine.storage" in g["ablations.engine.queue"]  # module level
    assert "ablations.tracking.tracker" in g["ablations.engine.worker"]  # inside work()
    assert "ablations.engine.launch" in g["runner"]  # inside cmd_run()
    assert "ablations.tracking.tracker" not in g["ablations.engine.queue"]  # only under TYPE_CHECKING


def test_no_import_cycle():
    bad = cycles(graph())
    assert not bad, "import cycles: " + "; ".join(" -> ".join(c) for c in bad)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_the_limit(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (at most {MAX_LINES}: split it by job)"


def test_model_imports_no_tracker():
    for path in sorted((ROOT / "model").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                # the network and its training loop know nothing of studies or trackers
                assert n.split(".")[0] not in ("mlflow", "optuna", "ablations"), \
                    f"{path.name} imports {n}"
