"""A worker: claim a run, train it with a heartbeat going, repeat until nothing is left.

Any number of workers, on any machines that reach both stores, work one study: a local one
started by `launch`, `runner.py worker` anywhere else. A worker killed outright leaves its trial
RUNNING with a heartbeat that stops; another worker (or the next launch) then re-queues the run
(ablations/engine/queue.py).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable

import optuna

from ablations.engine import queue, trial as trials
# (launch and the tests build a WorkerContext from here)
from ablations.engine.context import WorkerContext  # noqa: F401
from ablations.tracking.retry import StoreUnavailable
from ablations.engine.storage import heartbeat_s, open_storage, rdb, trial_id_of
from ablations.engine.study import load_study, plan_of


class Heartbeat:
    """Records the trials' heartbeats every CHORUS_HEARTBEAT_S seconds while their runs train."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_ids: list[int]):
        self.storage, self.trial_ids = storage, trial_ids
        self.stop = threading.Event()
        self.interval = heartbeat_s()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            for trial_id in self.trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a missed beat is not worth killing the run over
                    pass
            self.stop.wait(self.interval)

    def __enter__(self) -> "Heartbeat":
        # (Optuna's storages have no is_heartbeat_enabled(): an earlier check for it silently
        # never started this thread, so killed workers' trials were never found stale.)
        if rdb(self.storage).heartbeat_interval:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()


def work(ctx: WorkerContext, on_done: Callable[[dict[str, Any]], None] | None = None,
         out=sys.stdout) -> int:
    """Claim and execute runs until none is left (or the deadline passes). Returns runs executed.

    With nothing queued, a worker re-queues the runs of lost workers (stale heartbeats) and, if
    `ctx.wait`, waits while other workers still have runs in flight, so a run whose worker is
    killed is re-run by a survivor instead of waiting for the next launch.
    """
    from ablations.tracking.tracker import StudyTracker

    from ablations.engine.torch_setup import fit_threads

    if ctx.threads and not ctx.fit_threads:
        import torch

        torch.set_num_threads(ctx.threads)
    storage = open_storage(ctx.storage_url)
    study = load_study(ctx.spec, storage)
    tracker = StudyTracker(ctx.tracking_uri, ctx.spec.name)
    plan = plan_of(ctx.spec)
    run_trial = trials.run_search_trial if plan.search else trials.run_grid_trial
    n, waiting_since = 0, None
    group: list[optuna.Trial] = []
    try:
        while ctx.deadline is None or time.time() < ctx.deadline:
            trial = queue.claim(study, plan)
            group = [trial] if trial is not None else []  # (released on an interrupt)
            if trial is None:
                trial, in_flight, requeued = queue.refill(study, plan, tracker)
                group = [trial] if trial is not None else []
                if requeued:
                    print(f"re-queued {requeued} run(s) of lost workers", file=out, flush=True)
                    continue
            if trial is None:
                if not (ctx.wait and in_flight):
                    break
                if ctx.announce_wait and (waiting_since is None or time.time() - waiting_since > 60):
                    print(f"waiting: {in_flight} run(s) in flight in other workers (re-run here if "
                          f"their worker is lost)", file=out, flush=True)
                    waiting_since = time.time()
                time.sleep(min(heartbeat_s(), 5))
                continue
            waiting_since = None
            if ctx.threads and ctx.fit_threads:  # (the free cores, measured over the last run)
                fit_threads(ctx.threads)
            if not plan.search and (size := trials.ensemble_size(ctx, trial)) > 1:
                group += queue.claim_siblings(study, plan, trial, size - 1)
            with Heartbeat(storage, [trial_id_of(t) for t in group]):
                done = (trials.run_grid_trials(ctx, study, tracker, group) if len(group) > 1
                        else [run_trial(ctx, study, tracker, trial)])
            n += len(done)
            for attrs in done:
                if on_done:
                    on_done(attrs)
    except KeyboardInterrupt:  # between a claim and the run's own handler
        for t in group:
            queue.release(study, trial_id_of(t))
        raise
    return n


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def worker_process(ctx: WorkerContext) -> None:
    """Entry point of a local worker process (spawned by `launch`): SIGTERM stops it as Ctrl-C
    does (the run in flight re-queued)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    warnings.simplefilter("ignore")
    try:
        work(ctx)
    except KeyboardInterrupt:
        sys.exit(130)
    except StoreUnavailable as e:
        print(f"worker {queue.WORKER_ID}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
