#!/usr/bin/env python3
"""Runs queued per second: a big design enqueued in bulk vs one Optuna trial at a time.

    python benchmarks/queue_throughput.py [--runs 10000] [--sample 300]

On a fresh SQLite Optuna storage (in a temporary directory), with the code `runner.py run` uses:

  plan     study.plan_of(spec) and every run key: the plan the launch and every worker make
  bulk     queue.reconcile(): every run of the plan queued as a WAITING trial, in one
           transaction (storage.RetryingRDBStorage.enqueue_trials), under the queue lock
  resume   reconcile() again on the full queue: nothing to add (a second launch, a worker's end)
  claim    one worker claim (queue.claim) with the whole queue waiting
  one-by-one  the previous way, queue.enqueue_run() (Optuna's Study.enqueue_trial) per run,
           timed on the first `--sample` runs of the same plan in a second fresh study

The design: 2 cells (bias_init off/on) x runs/2 seeds, so that parsing the study file stays
cheap. Target: 10 000 runs queued in <= 10 s. The machine is shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.engine import queue  # noqa: E402
from ablations.engine.study import load_study, plan_of  # noqa: E402
from ablations.design.spec import parse_spec  # noqa: E402
from ablations.engine.storage import open_storage, queue_lock  # noqa: E402
from benchmarks._env import code_state, load_average  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=300, help="runs enqueued one by one")
    args = ap.parse_args()
    print(f"{code_state()}; {os.cpu_count()} cores; load {load_average()}")
    spec = parse_spec({"name": "q", "design": "full_factorial",
                       "factors": {"bias_init": ["off", "on"]}, "seeds": args.runs // 2}, "<bench>")
    tmp = Path(tempfile.mkdtemp(prefix="queue_throughput_"))

    t = time.perf_counter()
    plan = plan_of(spec)
    plan.keys  # (hashing every run's config is part of making the plan)
    t_plan = time.perf_counter() - t
    print(f"plan      {len(plan):>6} runs in {t_plan:6.2f} s ({len(plan) / t_plan:8.0f} runs/s)")

    storage = open_storage(f"sqlite:///{tmp}/bulk.db")
    study = load_study(spec, storage, create=True)
    t = time.perf_counter()
    with queue_lock(storage, spec.name):
        state = queue.reconcile(study, plan)
    t_bulk = time.perf_counter() - t
    assert len(state.enqueued) == len(plan)
    print(f"bulk      {len(plan):>6} runs in {t_bulk:6.2f} s ({len(plan) / t_bulk:8.0f} runs/s)"
          f"  [load {load_average()}]")
    t = time.perf_counter()
    with queue_lock(storage, spec.name):
        again = queue.reconcile(study, plan)
    t_resume = time.perf_counter() - t
    assert not again.enqueued and len(again.queued) == len(plan)
    print(f"resume    {len(plan):>6} runs checked in {t_resume:6.2f} s, none added")
    t = time.perf_counter()
    trial = queue.claim(study, plan)
    t_claim = time.perf_counter() - t
    assert trial is not None
    print(f"claim     one run with {len(plan) - 1} others waiting: {t_claim:6.2f} s")

    study1 = load_study(spec, open_storage(f"sqlite:///{tmp}/one.db"), create=True)
    t = time.perf_counter()
    for run in plan[:args.sample]:
        queue.enqueue_run(study1, spec, run, attempt=1)
    t_one = time.perf_counter() - t
    print(f"one-by-one {args.sample:>5} runs in {t_one:6.2f} s ({args.sample / t_one:8.0f} runs/s)"
          f"  [load {load_average()}]")
    rate_bulk, rate_one = len(plan) / t_bulk, args.sample / t_one
    print(f"\nqueued per second: bulk {rate_bulk:.0f}, one by one {rate_one:.0f}: "
          f"{rate_bulk / rate_one:.0f}x; {len(plan)} runs queued in {t_bulk:.1f} s "
          f"(+ {t_plan:.1f} s making the plan; target <= 10 s), one by one they would take "
          f"{len(plan) / rate_one:.0f} s")


if __name__ == "__main__":
    main()
