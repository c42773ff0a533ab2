"""No import cycle between the project's modules, and `model/` imports no tracker.

Imports inside functions count (a lazy import only hides a cycle); imports under
`if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {f"{pkg}.{f.stem}": f for pkg in ("model", "ablations") for f in (ROOT / pkg).glob("*.py")}
    out["runner"] = ROOT / "runner.py"
    return out


def imported(path: Path) -> set[str]:
    """Every module name imported anywhere in the file, except under `if TYPE_CHECKING:`."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for n in node.orelse:
                    self.visit(n)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            names.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return names


def test_no_import_cycle():
    mods = modules()
    graph = {m: (imported(p) & mods.keys()) - {m} for m, p in mods.items()}
    cycles = []
    for start in sorted(graph):  # every simple cycle once, from its smallest module name
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in sorted(graph[node]):
                if dep == start:
                    cycles.append(" -> ".join(path + [start]))
                elif dep not in path and dep > start:
                    stack.append((dep, path + [dep]))
    assert cycles == []


def test_model_imports_no_tracker():
    for path in (ROOT / "model").glob("*.py"):
        top = {n.split(".")[0] for n in imported(path)}
        assert not top & {"mlflow", "optuna", "ablations"}, path.name


def test_the_checker_sees_a_lazy_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.b\n"
                 "def f():\n    from c import d\n")
    assert imported(f) == {"typing", "typing.TYPE_CHECKING", "c", "c.d"}
