"""The code's layout: ablations/ in one folder per layer, imports that only point down the layers,
no import cycle (TYPE_CHECKING imports counted: they are cycles a reader still has to untangle),
no module over 550 lines, and `model/` (the training code) imports no tracker. Read off the
source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "ablations")
MAX_LINES = 550
# ablations/<layer>/ -> the layers its modules may import (besides their own, `model` and the
# package roots). The design is read by everyone; tracking is the only layer that talks to MLflow;
# the engine runs trials and records them through tracking; results compute on what tracking
# reads back; the UI (tracking/ui/) shows what tracking wrote; runner.py wires them all. A launch
# (engine) writes the study's saved views (tracking/ui/views.py) so that run descriptions can
# link to them from the first run on; tracking itself never imports the UI.
LAYERS = ("design", "engine", "tracking", "tracking.ui", "results")
MAY_IMPORT = {
    "design": set(),
    "tracking": {"design"},
    "tracking.ui": {"design", "tracking"},
    "engine": {"design", "tracking", "tracking.ui"},
    "results": {"design", "tracking"},
}
# What results may read through tracking: the read modules, never the writer.
RESULTS_READ = {"ablations.tracking.reads", "ablations.tracking.stored_runs"}
STORE_CLIENTS = ("mlflow", "sqlite3")  # MLflow's client, and the raw SQL on its schema


def modules() -> dict[str, Path]:
    out = {"runner": ROOT / "runner.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _names(tree: ast.AST) -> set[str]:
    """Every module name imported anywhere in `tree` (module level, in functions, and under
    `if TYPE_CHECKING:`), with `from a import b` giving both a and a.b."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def imports(path: Path, names: set[str]) -> set[str]:
    """The project modules `path` imports (a package's __init__ counts as the package)."""
    own = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    return {n for n in _names(ast.parse(path.read_text(), str(path))) if n in names and n != own}


def external(path: Path) -> set[str]:
    """The top-level names of everything `path` imports (mlflow, torch, ...)."""
    return {n.split(".")[0] for n in _names(ast.parse(path.read_text(), str(path)))}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str | None:
    """ablations.tracking.ui.views -> 'tracking.ui'; None outside ablations' layer folders."""
    rest = module.removeprefix("ablations.")
    return next((lay for lay in sorted(LAYERS, key=len, reverse=True)
                 if module.startswith("ablations.") and rest.startswith(lay + ".")), None)


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


def crossings(g: dict[str, set[str]]) -> list[str]:
    """Every import from one layer folder into a layer it may not import."""
    bad = []
    for mod, deps in sorted(g.items()):
        here = layer(mod)
        if here is None:
            continue
        for dep in sorted(deps):
            there = layer(dep)
            if there is None or there == here or there in MAY_IMPORT[here]:
                continue
            bad.append(f"{mod} ({here}) imports {dep} ({there})")
    return bad


def test_the_graph_sees_imports_at_module_and_function_level_and_under_type_checking():
    g = graph()
    assert "ablations.engine.storage" in g["ablations.engine.queue"]  # module level
    assert "ablations.tracking.tracker" in g["ablations.engine.worker"]  # inside work()
    assert "ablations.engine.launch" in g["runner"]  # inside cmd_run()
    assert "ablations.tracking.tracker" in g["ablations.engine.queue"]  # only under TYPE_CHECKING
    assert "ablations.engine.trial" in g["ablations.engine.worker"]  # `from pkg import module`


def test_every_module_sits_in_a_layer_folder():
    loose = [m for m in modules() if m.startswith("ablations.") and layer(m) is None
             and m not in {f"ablations.{lay}" for lay in LAYERS}]
    assert not loose, f"modules outside ablations/<layer>/: {loose}"


def test_no_import_cycle():
    bad = cycles(graph())
    assert not bad, "import cycles: " + "; ".join(" -> ".join(c) for c in bad)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down_the_layers():
    # results and the design never import the engine; tracking never imports the UI
    bad = crossings(graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_layer_check_catches_a_wrong_import():
    g = {"ablations.results.x": {"ablations.engine.y"}, "ablations.tracking.z": {
        "ablations.tracking.ui.v"}, "ablations.tracking.ui.v": {"ablations.tracking.z"},
         "ablations.design.d": {"ablations.tracking.z"}, "ablations.engine.y": set()}
    assert crossings(g) == [
        "ablations.design.d (design) imports ablations.tracking.z (tracking)",
        "ablations.results.x (results) imports ablations.engine.y (engine)",
        "ablations.tracking.z (tracking) imports ablations.tracking.ui.v (tracking.ui)"]


def test_results_read_through_tracking_and_never_write():
    g = graph()
    for mod in (m for m in g if layer(m) == "results"):
        into_tracking = {d for d in g[mod] if layer(d) in ("tracking", "tracking.ui")}
        assert into_tracking <= RESULTS_READ, f"{mod} imports {into_tracking - RESULTS_READ}"


def test_only_tracking_talks_to_mlflow():
    for name, path in modules().items():
        if layer(name) in ("tracking", "tracking.ui"):
            continue
        assert not external(path) & set(STORE_CLIENTS), f"{name} imports {external(path)}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_the_limit(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (at most {MAX_LINES}: split it by job)"


def test_model_imports_no_tracker():
    for path in sorted((ROOT / "model").rglob("*.py")):
        for n in _names(ast.parse(path.read_text(), str(path))):
            # the network and its training loop know nothing of studies or trackers
            assert n.split(".")[0] not in ("mlflow", "optuna", "ablations"), \
                f"{path.name} imports {n}"


def test_recipes_live_in_model_and_know_no_tracker():
    # every shipped recipe (model/recipe.py SHIPPED) is model code: it sits in model/ and, like
    # the loop it plugs into, imports no tracker, no study machinery (checked above for model/),
    # and the example of a user's own recipe imports only what a user has: model/, torch, numpy
    from model.recipe import SHIPPED

    for ref in SHIPPED.values():
        module = ref.split(":")[0]
        assert module.startswith("model."), ref
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), ref
    example = ROOT / "examples" / "my_recipe.py"
    assert {n.split(".")[0] for n in _names(ast.parse(example.read_text()))} <= {
        "dataclasses", "numpy", "torch", "model"}


def test_the_tests_mirror_the_folders():
    # a test file sits in tests/<folder>/ when it tests one folder's code: every folder has its
    # own, and no test folder is left without code to test
    code = {p.relative_to(ROOT / "ablations") for p in (ROOT / "ablations").rglob("*")
            if p.is_dir() and p.name != "__pycache__"} | {Path("model")}
    tests = {p.relative_to(ROOT / "tests") for p in (ROOT / "tests").rglob("*")
             if p.is_dir() and p.name != "__pycache__"}
    assert tests == code, f"tests/ folders {sorted(map(str, tests))} != code {sorted(map(str, code))}"



def stale_imports(path: Path, mods: set[str]) -> set[str]:
    """The ablations.* paths `path` imports that name no module here: a flat path from before
    the layer folders (ablations.views, `from ablations import analysis`), e.g. in code merged
    from a branch that forked before them. Such an import bypasses the layer checks above."""
    bad: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bad.update(a.name for a in node.names
                       if a.name.startswith("ablations") and a.name not in mods)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.startswith("ablations") and node.module not in mods:
                bad.add(node.module)
            elif node.module in {"ablations"} | {f"ablations.{lay}" for lay in LAYERS}:
                bad.update(f"{node.module}.{a.name}" for a in node.names
                           if f"{node.module}.{a.name}" not in mods)
    return bad


def test_no_module_imports_a_path_from_before_the_layer_folders(tmp_path):
    mods = modules()
    code = [*mods.values(), *sorted((ROOT / "tests").rglob("*.py")),
            *sorted((ROOT / "benchmarks").glob("*.py"))]
    bad = {str(p.relative_to(ROOT)): s for p in code if (s := stale_imports(p, set(mods)))}
    assert not bad, f"imports of flat paths (ablations/<layer>/ has them now): {bad}"
    probe = tmp_path / "old.py"  # the check itself sees each kind of flat path
    probe.write_text("from ablations import analysis\nfrom ablations.views import KIND_TAG\n"
                     "import ablations.retry\nfrom ablations.results import report\n")
    assert stale_imports(probe, set(mods)) == {"ablations.analysis", "ablations.views",
                                               "ablations.retry"}

def test_the_flat_names_of_moved_modules_still_import():
    # notebooks written before the layer folders say `from ablations import analysis, report`
    import importlib
    import subprocess
    import sys

    code = ("from ablations import analysis, report, stability, stability_report, designs, ui; "
            "import sys; print(analysis.__name__, designs.__name__, ui.__name__, "
            "'ablations.engine.trial' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    # the module itself, not a copy; and only what was asked for is imported
    assert out == ["ablations.results.analysis", "ablations.design.designs",
                   "ablations.tracking.ui.serve", "False"]
    with pytest.raises(AttributeError):  # no alias for what never was a flat module
        importlib.import_module("ablations").__getattr__("tracker")
