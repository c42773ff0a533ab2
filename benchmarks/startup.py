#!/usr/bin/env python3
"""Start-up: how long commands that do not train take, and when a spawned worker first claims a run.

    python benchmarks/startup.py [--repeats 5] [--old-rev REV] [--workers-repeats 2]

1. Commands, each a fresh `python runner.py ...` (median of --repeats, wall clock):
   `fixes`, `--help`, an argument error (`run --workers -1`), `status` of a queued 8-run study.
   Reference: `python -c "import torch, mlflow"`, the floor of the old import-everything start.
   With --old-rev, the same commands on that commit's code too (a `git archive` in a temporary
   directory), side by side, with ratios.
2. Worker start: `runner.py run --workers 2` on a small 16-run study (fresh SQLite stores, runs
   of 80 steps on a small model, long enough that the spawned worker gets runs too): from the
   command's start to each worker's first claimed run (its first trial's datetime_start; the
   launching process claims first). Its first training step follows within ~0.1 s (data for 8
   small songs, the MLflow child run).
   With --old-rev, the old code as well.
The machine is shared: the load average is printed; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._env import code_state, load_average  # noqa: E402

TINY = """\
name: tiny
design: full_factorial
factors:
  plain_residual: [off, on]
  lr: [1e-4, 3e-3]
seeds: 2
base: {n_songs: 4, frames: 128, n_features: 8, hidden_dim: 8, n_blocks: 1, epochs: 2,
       steps_per_epoch: 3, batch_size: 8, device: cpu}
"""


def timed(cmd: list[str], cwd: Path, code: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - t


WORKERS_STUDY = """\
name: tiny
design: full_factorial
factors:
  plain_residual: [off, on]
  lr: [1e-4, 3e-3]
seeds: 4
base: {n_songs: 8, frames: 256, hidden_dim: 16, n_blocks: 2, epochs: 2, steps_per_epoch: 40,
       device: cpu}
"""


def commands(code: Path, work: Path) -> dict[str, list[str]]:
    runner = [sys.executable, str(code / "runner.py")]
    return {"fixes": runner + ["fixes"], "--help": runner + ["--help"],
            "argument error": runner + ["run", "tiny.yaml", "--workers", "-1"],
            "status": runner + ["status", "tiny.yaml", "--storage", f"sqlite:///{work}/optuna.db"]}


def queue_tiny(code: Path, work: Path) -> None:
    (work / "tiny.yaml").write_text(TINY)
    subprocess.run([sys.executable, str(code / "runner.py"), "run", "tiny.yaml", "--workers", "0",
                    "--storage", f"sqlite:///{work}/optuna.db", "--tracking-uri",
                    f"sqlite:///{work}/mlflow.db"], cwd=work, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(code)})


def part_commands(codes: dict[str, Path], repeats: int, tmp: Path) -> None:
    print(f"\n1. commands that do not train, median of {repeats} fresh processes (s)")
    works = {}
    for name, code in codes.items():
        works[name] = tmp / f"cmd_{name}"
        works[name].mkdir()
        queue_tiny(code, works[name])
    times: dict[tuple[str, str], list[float]] = {}
    base = [sys.executable, "-c", "import torch, mlflow"]
    for _ in range(repeats):
        times.setdefault(("import torch, mlflow", "-"), []).append(timed(base, tmp, ROOT))
        for name, code in codes.items():
            for what, cmd in commands(code, works[name]).items():
                times.setdefault((what, name), []).append(timed(cmd, works[name], code))
    floor = statistics.median(times[("import torch, mlflow", "-")])
    label = 'python -c "import torch, mlflow"'
    print(f"  {label:<34} {floor:6.2f}   (the old start's floor)")
    for what in commands(ROOT, tmp):
        row = {name: statistics.median(times[(what, name)]) for name in codes}
        text = "  ".join(f"{name} {v:6.2f}" for name, v in row.items())
        ratio = (f"  old/now {row['old'] / row['now']:5.1f}x" if "old" in row else
                 f"  floor/now {floor / row['now']:5.1f}x")
        print(f"  runner.py {what:<24} {text}{ratio}")
    print(f"  [load {load_average()}]")


def first_claims(code: Path, work: Path) -> tuple[float, float, float]:
    """(parent, spawned worker): seconds from the command's start to its first claimed run;
    and the command's wall time (the whole study)."""
    import datetime

    import optuna

    (work / "tiny.yaml").write_text(WORKERS_STUDY)
    t0, t = datetime.datetime.now(), time.perf_counter()
    subprocess.run([sys.executable, str(code / "runner.py"), "run", "tiny.yaml", "--workers", "2",
                    "--no-report", "--storage", f"sqlite:///{work}/optuna.db", "--tracking-uri",
                    f"sqlite:///{work}/mlflow.db"], cwd=work, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(code)}, timeout=600)
    wall = time.perf_counter() - t
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/optuna.db").trials
    first: dict[str, float] = {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        w = t.user_attrs.get("worker", "?")
        first.setdefault(w, (t.datetime_start - t0).total_seconds())
    if len(first) < 2:
        return min(first.values()), float("nan"), wall  # the parent ran everything
    parent, child = sorted(first.values())  # the warm parent claims first
    return parent, child, wall


def part_workers(codes: dict[str, Path], repeats: int, tmp: Path) -> None:
    print(f"\n2. `runner.py run --workers 2`, a small 16-run study: seconds from the command's start to "
          f"each worker's first claimed run (median of {repeats})")
    res: dict[str, list[tuple[float, float, float]]] = {name: [] for name in codes}
    for r in range(repeats):
        for name, code in codes.items():
            work = tmp / f"workers_{name}_{r}"
            work.mkdir()
            res[name].append(first_claims(code, work))
            p, c, wall = res[name][-1]
            print(f"  repeat {r} {name:<4} launching process {p:5.2f} s, spawned worker {c:5.2f} s "
                  f"({c - p:5.2f} s later); study done in {wall:5.1f} s  [load {load_average()}]",
                  flush=True)
    med = {name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
                  statistics.median(x[1] - x[0] for x in v), statistics.median(x[2] for x in v))
           for name, v in res.items()}
    for name, (p, c, lag, wall) in med.items():
        print(f"  {name:<4} median: launching process {p:5.2f} s, spawned worker {c:5.2f} s, "
              f"the spawned worker {lag:5.2f} s after the launching process; study {wall:5.1f} s")
    if "old" in med:  # the lag cancels much of the machine's noise, which both processes share
        print(f"  spawned worker's first claim: old/now {med['old'][1] / med['now'][1]:.2f}x; its "
              f"lag behind the launching process: old {med['old'][2]:.1f} s, now "
              f"{med['now'][2]:.1f} s; launching process: old/now "
              f"{med['old'][0] / med['now'][0]:.2f}x; whole study: old/now "
              f"{med['old'][3] / med['now'][3]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers-repeats", type=int, default=2)
    ap.add_argument("--old-rev", default=None, help="also time this commit's code (e.g. main)")
    ap.add_argument("--part", choices=["all", "commands", "workers"], default="all")
    args = ap.parse_args()
    print(f"{code_state()}; {os.cpu_count()} cores; load {load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="startup_"))
    codes = {"now": ROOT}
    if args.old_rev:
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.old_rev], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        codes["old"] = old
        print(f"old: {args.old_rev}")
    if args.part in ("all", "commands"):
        part_commands(codes, args.repeats, tmp)
    if args.part in ("all", "workers"):
        part_workers(codes, args.workers_repeats, tmp)


if __name__ == "__main__":
    main()
