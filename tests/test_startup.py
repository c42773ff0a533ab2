"""Fast start and the process set-up of runner.py, as a user runs it (fresh interpreters).

Commands that do not train (`fixes`, `--help`, `status`, argument errors) must not import torch
or MLflow (1-3 s each on a busy 2-core machine); timing them is benchmarks/startup.py's job,
here only what gets imported is checked. Also: the thread policy that is free on an idle
machine and fair on a busy one (ablations/engine/torch_setup.py: a bounded OpenMP spin, threads
fitted to the free cores), and one-line warnings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from ablations.engine import torch_setup
from ablations.engine.torch_setup import FreeCores, calm_openmp, child_env

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runner.py"

# Runs runner.py as `python runner.py ARGS` does, then reports which heavy modules were loaded
# and the OpenMP wait policy the process ended up with, even when argparse exits.
PROBE = f"""
import atexit, json, os, runpy, sys
def report():
    print("PROBE " + json.dumps({{"modules": sorted(m for m in ("torch", "mlflow", "optuna")
                                                  if m in sys.modules),
                                 "omp": os.environ.get("OMP_WAIT_POLICY"),
                                 "spin": os.environ.get("GOMP_SPINCOUNT")}}), file=sys.stderr)
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


def test_runner_sets_a_bounded_spin_unless_the_user_chose_a_wait_policy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    seen = probe(tmp_path, "fixes", env=env)[1]
    assert (seen["omp"], seen["spin"]) == (None, "1000")
    seen = probe(tmp_path, "fixes", env={**env, "OMP_WAIT_POLICY": "active"})[1]
    assert (seen["omp"], seen["spin"]) == ("active", None)
    seen = probe(tmp_path, "fixes", env={**env, "GOMP_SPINCOUNT": "5"})[1]
    assert (seen["omp"], seen["spin"]) == (None, "5")


def test_calm_openmp_keeps_a_users_choice():
    env: dict[str, str] = {}
    assert calm_openmp(env) and env == {"GOMP_SPINCOUNT": "1000"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10"}):
        env = dict(mine)
        assert not calm_openmp(env) and env == mine


def test_worker_processes_inherit_the_bounded_spin(monkeypatch):
    """Local workers are started inside child_env (launch._run_processes): a child started
    there sees the policy even when this process (a library caller) runs without it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    show = [sys.executable, "-c", "import os; print(os.environ.get('GOMP_SPINCOUNT'))"]
    with child_env():
        inside = subprocess.run(show, capture_output=True, text=True, check=True).stdout.strip()
    after = subprocess.run(show, capture_output=True, text=True, check=True).stdout.strip()
    assert (inside, after, "GOMP_SPINCOUNT" in os.environ) == ("1000", "None", False)


class _Machine:
    """A fake /proc/stat and os.times(): `tick(wall, mine, others)` advances the clock by `wall`
    seconds while this process used `mine` CPUs and other processes `others`."""

    def __init__(self, monkeypatch, n_cores: int = 2):
        self.t, self.busy, self.own = 0.0, 0, 0.0
        monkeypatch.setattr(torch_setup.time, "perf_counter", lambda: self.t)
        monkeypatch.setattr(torch_setup, "_busy_ticks", lambda: self.busy)
        monkeypatch.setattr(torch_setup, "_own_cpu_s", lambda: self.own)
        monkeypatch.setattr(torch_setup, "cores", lambda: n_cores)
        self.hz = os.sysconf("SC_CLK_TCK")

    def tick(self, wall: float, mine: float, others: float) -> None:
        self.t += wall
        self.own += wall * mine
        self.busy += round(wall * (mine + others) * self.hz)


def test_free_cores_gives_a_run_the_cores_other_processes_leave(monkeypatch):
    """Idle: all the cores (up to the worker's share); one hog on 2 cores, even one squeezed to
    2/3 of a core by our own 2 spinning threads: 1 thread; two hogs: still 1 (never 0); the hog
    gone: 2 again. A window too short to measure keeps the last answer."""
    m = _Machine(monkeypatch)
    free = FreeCores()
    m.tick(2.0, mine=1.0, others=0.0)   # start-up alone
    assert free.threads(cap=2) == 2 and free.others == 0.0
    m.tick(3.0, mine=1.33, others=0.67)  # a hog arrived during a 2-thread run
    assert free.threads(cap=2) == 1
    m.tick(0.1, mine=1.0, others=0.0)   # 0.1 s: too short to say anything
    assert free.threads(cap=2) == 1
    m.tick(3.0, mine=1.0, others=2.0)
    assert free.threads(cap=2) == 1
    m.tick(3.0, mine=1.0, others=0.2)   # a light process: not worth giving a core up
    assert free.threads(cap=2) == 2
    m.tick(3.0, mine=1.0, others=0.0)
    assert free.threads(cap=1) == 1     # never more than the worker's share


def test_free_cores_without_proc_stat_keeps_the_share(monkeypatch):
    m = _Machine(monkeypatch)
    monkeypatch.setattr(torch_setup, "_busy_ticks", lambda: None)
    free = FreeCores()
    m.tick(2.0, mine=1.0, others=1.0)
    assert free.threads(cap=2) == 2 and free.others is None


def test_free_cores_reads_this_machine():
    """The real /proc/stat: a sane reading over a real window (this process busy meanwhile)."""
    free = FreeCores()
    free._t -= FreeCores.MIN_WINDOW_S  # (a window as long as the minimum, without waiting)
    sum(i * i for i in range(200_000))
    others = free.look()
    assert others is None or 0.0 <= others <= os.cpu_count() + 0.5
    assert 1 <= free.threads(cap=2) <= 2


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
