"""What does tracking cost? Run: python benchmarks/tracking_overhead.py [--repeats 5]

1. The same training run (fixed recipe, shortened) with the no-op `log` and with an MLflow child
   run's `log` on a local SQLite store, interleaved A/B/A/B... in one process. Time B includes
   creating the child run, its params and tags, every batched metric flush, the outcome metrics
   and the three artifacts: everything tracking adds to a run. Prints the throughput ratio
   (target >= 0.97).
2. Bookkeeping per run of a whole study (Optuna enqueue/pop/tell on SQLite + MLflow child run):
   a launch of N runs of a tiny model, minus the time spent inside train().
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablations.engine.launch import launch  # noqa: E402
from ablations.design.spec import parse_spec  # noqa: E402
from ablations.tracking.tracker import StudyTracker  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.data import make_data  # noqa: E402
from model.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8, help="8 = the default run (320 steps)")
    ap.add_argument("--bookkeeping-runs", type=int, default=12)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tracking_bench_"))
    os.chdir(tmp)  # MLflow's ./mlruns artifacts land here
    cfg = TrainConfig(epochs=args.epochs)
    make_data(cfg)  # generate (and cache) the songs outside the timings
    tracker = StudyTracker(f"sqlite:///{tmp}/mlflow.db", "bench")
    tracker.ensure_experiment("tracking overhead benchmark", {})
    train(cfg, data=None)  # warm-up

    plain, tracked = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        res = train(cfg)
        plain.append(res.steps / (time.perf_counter() - t))
        t = time.perf_counter()
        child = tracker.start_child(None, f"bench {r}", cfg, tags={})
        res = train(cfg, log=child.log)
        child.finish(res, extra_tags={})
        child.terminate()
        tracked.append(res.steps / (time.perf_counter() - t))
        print(f"repeat {r}: no-op log {plain[-1]:6.1f} steps/s   MLflow log {tracked[-1]:6.1f} steps/s",
              flush=True)
    values = res.steps * 4 + res.epochs * 4
    ratio = statistics.median(b / a for a, b in zip(plain, tracked))
    print(f"\nrun of {res.steps} steps, {values} metric values: median no-op {statistics.median(plain):.1f} "
          f"steps/s, MLflow {statistics.median(tracked):.1f} steps/s")
    print(f"MLflow-tracked / no-op steps/s ratio: {ratio:.3f} (target >= 0.97)")

    # 2. bookkeeping per run of a study
    n = args.bookkeeping_runs
    spec = parse_spec({
        "name": "bookkeeping", "design": "full_factorial",
        "factors": {"lr": [1e-4, 3e-4, 5e-4]}, "seeds": max(1, n // 3),
        "base": {"n_songs": 6, "frames": 32, "hidden_dim": 8, "n_blocks": 1, "epochs": 1,
                 "steps_per_epoch": 3, "batch_size": 2}}, "<bench>")
    t = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        out = launch(spec, f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db", 1, out=devnull)
    total = time.perf_counter() - t
    import optuna

    study = optuna.load_study(study_name="bookkeeping", storage=f"sqlite:///{tmp}/optuna.db")
    train_s = sum(tr.user_attrs["wall_time_s"] for tr in study.trials if tr.state.name == "COMPLETE")
    print(f"\nstudy launch of {out.done} tiny runs: {total:.2f} s total, {train_s:.2f} s in train()")
    print(f"bookkeeping per run (Optuna SQLite + MLflow SQLite, incl. study set-up): "
          f"{(total - train_s) / out.done:.3f} s")


if __name__ == "__main__":
    main()
