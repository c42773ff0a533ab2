"""A user's own recipe from outside the package, as the README's "Your own model" shows it: a
tiny MLP with two fixes in a module of its own, in a temporary folder, run through the CLI
(Optuna, MLflow, the report) exactly as a user would. The recipe is examples/my_recipe.py (the
README shows it), copied next to the study file in a folder outside the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runner.py"
SOURCE = ROOT / "examples" / "my_recipe.py"

STUDY = """\
name: own_mlp
recipe: my_recipe.py:RECIPE
description: Which of the MLP's two fixes matters?
design: full_factorial
factors:
  small_init: [off, on]
  standardize: [off, on]
stress:
  lr: [1e-2, 1, 100]
seeds: 2
base: {epochs: 2, steps_per_epoch: 10, device: cpu}
"""


def runner(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(SOURCE, tmp_path / "my_recipe.py")
    (tmp_path / "own.yaml").write_text(STUDY)
    return tmp_path


def test_fixes_and_train_of_a_recipe_in_a_file(folder):
    p = runner(folder, "fixes", "--recipe", "my_recipe.py:RECIPE")
    assert p.returncode == 0, p.stderr
    assert [l.split()[0] for l in p.stdout.splitlines()[2:4]] == ["small_init", "standardize"]
    p = runner(folder, "train", "--recipe", "my_recipe.py:RECIPE", "--baseline", "broken",
               "--set", "epochs=1", "--set", "steps_per_epoch=5")
    assert p.returncode == 0, p.stderr
    assert "'init_std': 3.0, 'standardize': False}" in p.stdout.splitlines()[0]
    assert "status " in p.stdout and "5 steps" in p.stdout


def test_a_recipe_that_fails_to_import_is_one_line(folder):
    (folder / "broken_recipe.py").write_text("import not_a_module_anywhere\n")
    p = runner(folder, "fixes", "--recipe", "broken_recipe.py:RECIPE")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: recipe: 'broken_recipe.py:RECIPE': " + str((folder / "broken_recipe.py").resolve())
        + " failed to load: ModuleNotFoundError: No module named 'not_a_module_anywhere'"]


@pytest.mark.slow  # 48 tiny runs in a fresh process: about a minute on a busy 2-core machine
def test_a_study_of_a_recipe_from_outside_the_package(folder):
    storage, tracking = f"sqlite:///{folder}/optuna.db", f"sqlite:///{folder}/mlflow.db"
    p = runner(folder, "run", "own.yaml", "--storage", storage, "--tracking-uri", tracking)
    assert p.returncode == 0, p.stderr
    assert "study own_mlp: full_factorial, 2 factors x stress lr, 24 runs (0 done" in p.stdout
    assert "24/24 runs done" in p.stdout
    # the runner's own analysis judged the recipe's fixes, not the chorus CNN's
    verdicts = p.stdout[p.stdout.index("verdicts (24 runs):"):]
    assert "small_init" in verdicts and "standardize" in verdicts and "bias_init" not in verdicts
    report = (folder / "reports" / "own_mlp" / "report.md").read_text()
    assert "small_init" in report and "LR50" in report
    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("own_mlp")
    assert exp.tags["study.recipe"] == "my_recipe.py:RECIPE"
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'", max_results=100)
    assert len(runs) == 24
    r = runs[0]
    assert r.data.tags["recipe"] == "tiny_mlp" and r.data.params["hidden"] == "32"
    assert {r.data.tags["fix.small_init"] for r in runs} == {"on", "off"}
    assert "train/loss" in r.data.metrics and "outcome.final_val_f1" in r.data.metrics
    # resumable like any study: run again, nothing is trained twice
    p = runner(folder, "run", "own.yaml", "--storage", storage, "--tracking-uri", tracking)
    assert p.returncode == 0, p.stderr
    assert "24 runs (24 done" in p.stdout


def test_the_readme_shows_this_recipe():
    """README "Your own model" prints examples/my_recipe.py whole (its docstring aside)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    block = section[section.index("```python\n") + 10:]
    block = block[:block.index("```\n")]
    source = SOURCE.read_text()
    assert source.split('"""\n', 2)[-1].lstrip("\n") == block
