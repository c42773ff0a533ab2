#!/usr/bin/env python3
"""Where the README's main job spends its time: training, and everything that is not training.

    python benchmarks/main_job.py [--study studies/quick.yaml] [--repeats 2]

Each repeat runs `python runner.py run STUDY` twice in fresh temporary folders (fresh SQLite
stores, as a newcomer's first run), interleaved:
  plain         the command as the README gives it: its wall time, nothing else;
  instrumented  the same command through a driver that imports what the command will import
                (timed: "start + imports"), then calls runner.main with timers wrapped around
                the functions below. Time is charged to the innermost timer running (a
                validation inside train() counts as validation, not as training).

  start + imports     interpreter start, then torch, MLflow, Optuna, the project, torch._dynamo
                      (which torch's optimizers import on first use)
  stores + launch     check_tracking, open_study (Optuna DB), the dashboard note, StudyTracker
                      (MLflow DB), the experiment, launch run, reconcile, orphans, saved views
  train: steps        Run.train_step: forward, backward, optimizer, per-step metrics
  train: forensics    Run.nonfinite_step: locating a non-finite step (replays it)
  train: validation   model.train.evaluate
  train: set-up       the rest of train(): songs, model, optimizer, result
  MLflow per run      opening and finishing each run's MLflow child (params, tags, outcome,
                      artifacts) and its metric flushes
  Optuna per run      claiming a run, the trial's outcome attributes and tell
  report              the report, its figures, logging it to MLflow
  other               what no timer covers (argument parsing, the progress lines, exit)

The load average and whether other processes used the CPUs (/proc/stat) are printed for each
measurement: compare the shares, and the plain vs instrumented wall times, from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._env import CpuWatch, code_state, load_average  # noqa: E402

DRIVER = r'''
import json, sys, time
t_start = time.time()
sys.path.insert(0, {root!r})
sys.argv = [{runner!r}, "run", {study!r}]
import runner  # (sets the thread policy first, as `python runner.py` does)
import torch, torch._dynamo, mlflow, optuna  # noqa: F401
import ablations.engine.launch, ablations.engine.trial, ablations.engine.queue  # noqa: F401
import ablations.tracking.tracker, ablations.results.report, model.train  # noqa: F401
t_imported = time.time()

spent, stack = {{}}, []

def timed(owner, name, phase):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        if stack:  # pause the enclosing phase
            outer, since = stack[-1]
            spent[outer] = spent.get(outer, 0.0) + t - since
        stack.append([phase, t])
        try:
            return fn(*a, **k)
        finally:
            p, since = stack.pop()
            now = time.perf_counter()
            spent[p] = spent.get(p, 0.0) + now - since
            if stack:
                stack[-1][1] = now
    setattr(owner, name, wrapper)

import ablations.engine.launch as L, ablations.engine.trial as T, ablations.engine.queue as Q
import ablations.engine.worker as W, ablations.tracking.tracker as TR, model.train as M
STORES = "stores + launch"
for name in ("check_tracking", "open_study", "write_dashboard_note", "reconcile",
             "close_orphans", "_write_views"):
    timed(L, name, STORES)
for name in ("__init__", "ensure_experiment", "close_stale_launches", "start_launch",
             "end_launch"):
    timed(TR.StudyTracker, name, STORES)
timed(M, "train", "train: set-up")
T.train = M.train  # (trial.py resolves model.train.train lazily: hand it the timed one)
timed(M.Run, "train_step", "train: steps")
timed(M.Run, "nonfinite_step", "train: forensics")
timed(M, "evaluate", "train: validation")
for name in ("_start_child", "_finish_child"):
    timed(T, name, "MLflow per run")
timed(TR.ChildRun, "flush", "MLflow per run")
timed(TR.StudyTracker, "finish_run", "MLflow per run")
timed(Q, "claim", "Optuna per run")
timed(Q, "refill", "Optuna per run")
for name in ("_claimed", "_complete"):
    timed(T, name, "Optuna per run")
timed(runner, "_report", "report")
t_main = time.time()
code = runner.main(["run", {study!r}])
t_end = time.time()
print("BENCH " + json.dumps({{"imports": t_imported - t_start, "main": t_end - t_main,
                             "spent": spent, "t_start": t_start, "t_end": t_end}}))
sys.exit(code)
'''


def plain(study: Path, work: Path) -> tuple[float, CpuWatch]:
    with CpuWatch() as w:
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "runner.py"), "run", study.name], cwd=work,
                       check=True, capture_output=True)
        wall = time.perf_counter() - t
    return wall, w


def instrumented(study: Path, work: Path) -> tuple[float, dict, CpuWatch]:
    code = DRIVER.format(root=str(ROOT), runner=str(ROOT / "runner.py"), study=study.name)
    with CpuWatch() as w:
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", code], cwd=work, check=True,
                             capture_output=True, text=True).stdout
        wall = time.time() - t0
    got = json.loads(next(ln for ln in out.splitlines() if ln.startswith("BENCH "))[6:])
    got["start"] = got["t_start"] - t0  # interpreter start, before the driver's first line
    got["exit"] = t0 + wall - got["t_end"]
    return wall, got, w


def fresh(study: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="main_job_"))
    shutil.copy(study, work / study.name)
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default=str(ROOT / "studies" / "quick.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    study = Path(args.study).resolve()
    print(f"{code_state()}; {os.cpu_count()} cores; load {load_average()}; "
          f"runner.py run {study.name}, fresh stores each time")
    walls, rows = [], []
    for r in range(args.repeats):
        work = fresh(study)
        try:
            wall, w = plain(study, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        walls.append(wall)
        print(f"  repeat {r} plain         {wall:6.1f} s  {w}  [load {load_average()}]", flush=True)
        work = fresh(study)
        try:
            wall, got, w = instrumented(study, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        phases = {"start + imports": got["start"] + got["imports"], **got["spent"]}
        phases["other"] = wall - sum(phases.values())
        rows.append((wall, phases))
        print(f"  repeat {r} instrumented  {wall:6.1f} s  {w}  [load {load_average()}]", flush=True)

    order = ["start + imports", "stores + launch", "train: steps", "train: forensics",
             "train: validation", "train: set-up", "MLflow per run", "Optuna per run", "report",
             "other"]
    print(f"\nplain wall time, median of {len(walls)}: {statistics.median(walls):.1f} s; "
          f"instrumented: {statistics.median(w for w, _ in rows):.1f} s")
    print(f"  {'phase':<20} {'s (median)':>10} {'share':>7}")
    med = {k: statistics.median(p.get(k, 0.0) for _, p in rows) for k in order}
    total = sum(med.values())
    for k in order:
        print(f"  {k:<20} {med[k]:10.2f} {med[k] / total:7.1%}")
    training = sum(med[k] for k in order if k.startswith("train: steps"))
    print(f"  not training steps: {1 - training / total:.0%} of the command")
    print(f"load at the end {load_average()}")


if __name__ == "__main__":
    main()
