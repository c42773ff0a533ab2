"""Does a second worker pay, and what does a shared PostgreSQL storage cost per run?

    python benchmarks/worker_scaling.py [--runs 8] [--epochs 4] [--repeats 2]
        [--postgres postgresql://USER@127.0.0.1:PORT/postgres]

1. Runs per hour with 1 vs 2 workers (`launch(..., workers=k)`, exactly what
   `runner.py run --workers k` does: k processes, cores split between them), the same study of
   `--runs` fixed-recipe runs shortened to `--epochs`, alternating 1, 2, 1, 2, ... in one run
   of this script, each on fresh local SQLite stores. Two ratios: end to end (the user's wall
   clock, process start-up and imports included) and while working (first run started to last
   run finished, from the trials' own timestamps). Target >= 1.8x on a 2-core machine.
2. Bookkeeping per run: a study of tiny runs (train() takes milliseconds) on an SQLite vs a
   PostgreSQL Optuna storage (MLflow on SQLite in both), alternating; wall time minus the time
   inside train(), per run. Needs --postgres (an admin URL; a database is created and dropped)
   or CHORUS_TEST_POSTGRES (`eval "$(bash .ci/postgres)"` starts one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ablations.execute import launch, threads_per_worker  # noqa: E402
from ablations.spec import parse_spec  # noqa: E402
from benchmarks._env import code_state, load_average  # noqa: E402


def study_spec(name: str, runs: int, base: dict) -> object:
    return parse_spec({"name": name, "design": "full_factorial",
                       "factors": {"plain_residual": ["off", "on"]}, "seeds": max(1, runs // 2),
                       "base": base}, "<bench>")


def timed_launch(spec, storage: str, tracking: str, workers: int) -> tuple[float, float, float]:
    """(end-to-end s, working s, s inside train()) of one launch."""
    t = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        res = launch(spec, storage, tracking, workers, out=devnull)
    wall = time.perf_counter() - t
    assert res.done == res.total, f"{res.done}/{res.total} runs done"
    trials = [tr for tr in optuna.load_study(study_name=spec.name, storage=storage).trials
              if tr.state == TrialState.COMPLETE]
    working = (max(tr.datetime_complete for tr in trials) -
               min(tr.datetime_start for tr in trials)).total_seconds()
    return wall, working, sum(tr.user_attrs["wall_time_s"] for tr in trials)


def scaling(args: argparse.Namespace, tmp: Path) -> None:
    base = {"epochs": args.epochs}  # the fixed recipe, shortened
    print(f"1. {args.runs} fixed-recipe runs of {args.epochs} epochs; 1 worker = "
          f"{threads_per_worker(1)} torch threads, 2 workers = {threads_per_worker(2)} each")
    rates: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(args.repeats):
        for k in (1, 2):
            d = tmp / f"scale{r}_{k}"
            d.mkdir()
            os.chdir(d)
            wall, working, _ = timed_launch(study_spec(f"scale{r}{k}", args.runs, base),
                                            f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db", k)
            rates[k].append((args.runs / wall * 3600, args.runs / working * 3600))
            print(f"  repeat {r}, {k} worker(s): {wall:6.1f} s end to end ({rates[k][-1][0]:5.0f} "
                  f"runs/h), {working:6.1f} s working ({rates[k][-1][1]:5.0f} runs/h)  "
                  f"[load {load_average()}]", flush=True)
    e2e = statistics.median(b[0] / a[0] for a, b in zip(rates[1], rates[2]))
    work = statistics.median(b[1] / a[1] for a, b in zip(rates[1], rates[2]))
    print(f"2 workers / 1 worker runs per hour: {e2e:.2f}x end to end, {work:.2f}x while working "
          f"(median of {args.repeats} pairs; target >= 1.8x)")


def bookkeeping(args: argparse.Namespace, tmp: Path, admin: str) -> None:
    import psycopg

    db = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    pg_url = admin.rsplit("/", 1)[0] + "/" + db
    tiny = {"n_songs": 6, "frames": 32, "hidden_dim": 8, "n_blocks": 1, "epochs": 1,
            "steps_per_epoch": 3, "batch_size": 2, "device": "cpu"}
    per_run: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    try:
        print(f"\n2. bookkeeping per run, {args.bookkeeping_runs} tiny runs per launch, 1 worker")
        for r in range(args.repeats):
            for kind in ("sqlite", "postgresql"):
                d = tmp / f"book{r}_{kind}"
                d.mkdir()
                os.chdir(d)
                storage = f"sqlite:///{d}/optuna.db" if kind == "sqlite" else pg_url
                wall, _, train_s = timed_launch(study_spec(f"book{r}{kind[:2]}", args.bookkeeping_runs,
                                                           tiny), storage, f"sqlite:///{d}/mlflow.db", 1)
                per_run[kind].append((wall - train_s) / args.bookkeeping_runs)
                print(f"  repeat {r}, Optuna on {kind:<10}: {per_run[kind][-1] * 1000:6.0f} ms per "
                      f"run outside train()", flush=True)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    s, p = statistics.median(per_run["sqlite"]), statistics.median(per_run["postgresql"])
    print(f"bookkeeping per run (Optuna + MLflow child run, study set-up included): SQLite "
          f"{s * 1000:.0f} ms, PostgreSQL {p * 1000:.0f} ms; PostgreSQL / SQLite {p / s:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8, help="runs per launch in part 1 (even)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run in part 1 (8 = default)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating pairs per part")
    ap.add_argument("--bookkeeping-runs", type=int, default=16)
    ap.add_argument("--postgres", default=os.environ.get("CHORUS_TEST_POSTGRES"),
                    help="PostgreSQL admin URL for part 2 (default $CHORUS_TEST_POSTGRES)")
    ap.add_argument("--part", choices=["all", "scaling", "bookkeeping"], default="all")
    args = ap.parse_args()
    print(f"{code_state()}; {os.cpu_count()} cores; load {load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="worker_scaling_"))
    if args.part in ("all", "scaling"):
        scaling(args, tmp)
    if args.part in ("all", "bookkeeping"):
        if not args.postgres:
            print("\n2. skipped: no PostgreSQL (pass --postgres URL or start one with "
                  "`eval \"$(bash .ci/postgres)\"`)")
        else:
            bookkeeping(args, tmp, args.postgres)


if __name__ == "__main__":
    main()
