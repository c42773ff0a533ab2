"""Does a second worker pay, and what does a shared PostgreSQL storage cost per run?

    python benchmarks/worker_scaling.py [--runs 8] [--epochs 4] [--repeats 2]
        [--postgres postgresql://USER@127.0.0.1:PORT/postgres]

1. Runs per hour of the same study (`--runs` fixed-recipe runs shortened to `--epochs`), each
   launch on fresh local SQLite stores, the three set-ups alternating in one run of this script:
     A  1 worker, 2 torch threads    `runner.py run` (the default: one worker uses every core)
     B  2 workers, 1 thread each     `runner.py run --workers 2` (cores split between them)
     C  1 worker, 1 thread           the per-worker reference
   B/C is worker scaling at equal threads per worker (target >= 1.8x on 2 cores); B/A is what a
   second worker gains over the default on this machine. Both end to end (the user's wall clock,
   process start-up and imports included) and in steady state (workers / mean duration of a
   run's trial, start to finish, as measured with that many workers busy side by side).
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

from ablations.engine.launch import launch, threads_per_worker  # noqa: E402
from ablations.design.spec import parse_spec  # noqa: E402
from benchmarks._env import code_state, load_average  # noqa: E402


def study_spec(name: str, runs: int, base: dict) -> object:
    return parse_spec({"name": name, "design": "full_factorial",
                       "factors": {"plain_residual": ["off", "on"]}, "seeds": max(1, runs // 2),
                       "base": base}, "<bench>")


def timed_launch(spec, storage: str, tracking: str, workers: int,
                 threads: int | None = None) -> tuple[float, float, float]:
    """(end-to-end s, mean s per run's trial, s inside train()) of one launch."""
    t = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        res = launch(spec, storage, tracking, workers, out=devnull, threads=threads)
    wall = time.perf_counter() - t
    assert res.done == res.total, f"{res.done}/{res.total} runs done"
    trials = [tr for tr in optuna.load_study(study_name=spec.name, storage=storage).trials
              if tr.state == TrialState.COMPLETE]
    per_run = statistics.fmean((tr.datetime_complete - tr.datetime_start).total_seconds()
                               for tr in trials)
    return wall, per_run, sum(tr.user_attrs["wall_time_s"] for tr in trials)


SETUPS = {"A": (1, None), "B": (2, None), "C": (1, 1)}  # name: (workers, threads per worker)


def scaling(args: argparse.Namespace, tmp: Path) -> None:
    base = {"epochs": args.epochs, "device": "cpu"}  # the fixed recipe, shortened
    print(f"1. {args.runs} fixed-recipe runs of {args.epochs} epochs per launch; A = 1 worker x "
          f"{threads_per_worker(1)} threads, B = 2 workers x {threads_per_worker(2)}, C = 1 worker x 1")
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in SETUPS}
    for r in range(args.repeats):
        for name, (workers, threads) in SETUPS.items():
            d = tmp / f"scale{r}_{name}"
            d.mkdir()
            os.chdir(d)
            wall, per_run, _ = timed_launch(study_spec(f"scale{r}{name}", args.runs, base),
                                            f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db",
                                            workers, threads)
            rates[name].append((args.runs / wall * 3600, workers / per_run * 3600))
            print(f"  repeat {r}, {name}: {wall:6.1f} s end to end ({rates[name][-1][0]:5.0f} "
                  f"runs/h), {per_run:5.2f} s per run on each worker ({rates[name][-1][1]:5.0f} "
                  f"runs/h steady)  [load {load_average()}]", flush=True)

    def ratio(x: str, y: str, i: int) -> float:
        return statistics.median(b[i] / a[i] for a, b in zip(rates[y], rates[x]))

    for x, y, what in (("B", "C", "worker scaling, 2 vs 1 single-thread workers (target >= 1.8x)"),
                       ("B", "A", "2 workers vs the default 1 worker with 2 threads")):
        print(f"{x}/{y} runs per hour: {ratio(x, y, 0):.2f}x end to end, {ratio(x, y, 1):.2f}x "
              f"steady state  ({what}; median of {args.repeats})")


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
