"""Fast start and the process set-up of runner.py, as a user runs it (fresh interpreters).

Commands that do not train (`fixes`, `--help`, `status`, argument errors) must not import torch
or MLflow (1-3 s each on a busy 2-core machine); timing them is benchmarks/startup.py's job,
here only what gets imported is checked. Also: the passive OpenMP wait policy that keeps
threads from spinning on a busy machine (ablations/engine/torch_setup.py), and one-line warnings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from ablations.engine.torch_setup import calm_openmp, child_env

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runner.py"

# Runs runner.py as `python runner.py ARGS` does, then reports which heavy modules were loaded
# and the OpenMP wait policy the process ended up with, even when argparse exits.
PROBE = f"""
import atexit, json, os, runpy, sys
def report():
    print("PROBE " + json.dumps({{"modules": sorted(m for m in ("torch", "mlflow", "optuna")
                                                  if m in sys.modules),
                                 "omp": os.environ.get("OMP_WAIT_POLICY")}}), file=sys.stderr)
atexit.register(report)
sys.argv = [{str(RUNNER)!r}] + sys.argv[1:]
sys.path.insert(0, {str(ROOT)!r})
runpy.run_path({str(RUNNER)!r}, run_name="__main__")
"""

ONE_FIX = "factors: {plain_residual: [off, on]}\n"  # the tiny study: 2 x 2 seeds


def probe(cwd: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True,
                       text=True, timeout=120, env=env)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("PROBE ")][-1]
    return p, json.loads(line[len("PROBE "):])


@pytest.mark.parametrize("args", [
    ["fixes"], ["--help"], ["run", "--help"], ["no-such-command"], ["run"],
    ["run", "missing.yaml"], ["run", "tiny.yaml", "--workers", "-1"],
    ["worker", "tiny.yaml", "--local-workers", "0"], ["plan", "tiny.yaml"],
], ids=lambda a: " ".join(a))
def test_commands_that_do_not_train_import_neither_torch_nor_mlflow_nor_optuna(tmp_path, args,
                                                                               tiny_study):
    tiny_study(tmp_path, "tiny", ONE_FIX)
    p, seen = probe(tmp_path, *args)
    assert p.returncode in (0, 2), p.stderr
    assert "Traceback" not in p.stderr
    assert seen["modules"] == [], seen


def test_status_imports_optuna_but_neither_torch_nor_mlflow(tmp_path, tiny_study):
    tiny_study(tmp_path, "tiny", ONE_FIX)
    optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    p, seen = probe(tmp_path, "status", "tiny.yaml")
    assert p.returncode == 0, p.stderr
    assert "study tiny: 0/4 done" in p.stdout
    assert seen["modules"] == ["optuna"]


def test_runner_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert probe(tmp_path, "fixes", env=env)[1]["omp"] == "PASSIVE"
    assert probe(tmp_path, "fixes", env={**env, "OMP_WAIT_POLICY": "active"})[1]["omp"] == "active"
    assert probe(tmp_path, "fixes", env={**env, "GOMP_SPINCOUNT": "1000"})[1]["omp"] is None


def test_calm_openmp_keeps_a_users_choice():
    env: dict[str, str] = {}
    assert calm_openmp(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10"}):
        env = dict(mine)
        assert not calm_openmp(env) and env == mine


def test_worker_processes_inherit_the_passive_policy(monkeypatch):
    """Local workers are started inside child_env (launch._run_processes): a child started
    there sees the policy even when this process (a library caller) runs without it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    show = [sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"]
    with child_env():
        inside = subprocess.run(show, capture_output=True, text=True, check=True).stdout.strip()
    after = subprocess.run(show, capture_output=True, text=True, check=True).stdout.strip()
    assert (inside, after, "OMP_WAIT_POLICY" in os.environ) == ("PASSIVE", "None", False)


def test_cli_warnings_are_one_line_each(tmp_path):
    """A warning raised inside a command prints as one `warning:` line: no Python source line
    under it (it used to show e.g. `out.append(parse_segments(p))`), newlines folded."""
    code = (f"import sys, warnings; sys.path.insert(0, {str(ROOT)!r}); import runner\n"
            "from model.harmonix import HarmonixWarning\n"
            "def noisy(args):\n"
            "    warnings.warn('first line\\n  second line', HarmonixWarning)\n"
            "    warnings.warn('a library speaks', DeprecationWarning)\n"
            "    return 0\n"
            "runner.cmd_fixes = noisy\n"
            "warnings.simplefilter('always')\n"
            "sys.exit(runner.main(['fixes']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == ["warning: first line second line",
                                     "warning: a library speaks (DeprecationWarning)"]
