"""Execution: one Optuna study per study file, every run enqueued once, workers pop runs.

Why not Optuna's GridSampler: under several workers it silently skips and duplicates grid
points. Instead the launcher enqueues every run (cell x seed) as a fixed trial, once; workers
only *pop* waiting trials (never ask the sampler for new ones), so each run executes once.

  * a diverged or collapsed run is a result: its trial is COMPLETE, never retried;
  * an exception marks the trial FAIL with its traceback and re-enqueues the run, at most
    `retries` times;
  * Ctrl-C (or SIGTERM) marks the run in flight FAIL/"interrupted" and re-enqueues it;
    interrupted attempts do not count as crashes;
  * a worker killed outright leaves its trial RUNNING; its heartbeat stops, and another worker
    (or the next launch) marks it lost (FAIL, its MLflow run KILLED) and re-enqueues the run;
    this counts as a crashed attempt;
  * running the same command again resumes: runs with a COMPLETE trial are never re-run.

Search designs (TPE / random) are the exception to "enqueue everything": a trial is one sampled
cell, trained at every seed (one MLflow run each), and its value is the mean over seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from ablations import designs
from ablations.defaults import DEFAULT_STORAGE, DEFAULT_TRACKING  # noqa: F401 (re-exported)
from ablations.designs import Cell, Run
from ablations.spec import StudySpec, format_value
from ablations.storage import (StoreError, StoreUnavailable, adopt_trial, describe_error,
                               finished_trial_ids, heartbeat_s, is_transient, open_storage,
                               queue_lock, rdb, safe_url, stale_trials, trial_states_by_user_attr,
                               waiting_trial_ids)
from ablations.torch_setup import child_env
from model.config import HighLearningRateWarning, TrainConfig

if TYPE_CHECKING:  # imported where used: `status` and the queue need neither torch nor MLflow
    from ablations.tracking import StudyTracker
    from model.train import TrainResult

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # recorded on every MLflow run

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and fail_stale_trials are marked experimental (since Optuna 2.9); we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We keep our own heartbeat thread around study.ask(); Optuna warns that ask() has none.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.design == "search" and spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=0, n_startup_trials=min(10, max(2, (spec.trials or 10) // 3)))
    return optuna.samplers.RandomSampler(seed=0)


def load_study(spec: StudySpec, storage: optuna.storages.BaseStorage,
               create: bool = False) -> optuna.Study:
    if create:
        study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                    direction=spec.direction, sampler=_sampler(spec))
        if study.metric_names != [spec.objective_metric]:  # optuna-dashboard's axis label
            study.set_metric_names([spec.objective_metric])
        return study
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec))


# --------------------------------------------------------------------------- the queue
@dataclass
class QueueState:
    """Where every run of the plan stands, from the study's trials."""

    done: list[str] = field(default_factory=list)  # run keys with a COMPLETE trial
    running: list[str] = field(default_factory=list)  # RUNNING (a worker's, maybe a lost one's)
    queued: list[str] = field(default_factory=list)  # WAITING before this call
    gave_up: list[str] = field(default_factory=list)  # crashed more than `retries` times
    enqueued: list[str] = field(default_factory=list)  # enqueued by this call

    @property
    def pending(self) -> list[str]:
        """Runs that will finish without being enqueued again: RUNNING or WAITING."""
        return self.running + self.queued


def _attempts(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Crashed attempts: FAIL trials not caused by an interrupt (stale = a killed worker counts)."""
    return sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))


def _trials_by_key(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    out: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("run_key")
        if key:
            out.setdefault(key, []).append(t)
    return out


def _queue_entry(spec: StudySpec, run: Run, attempt: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run as an enqueued trial: its fixed params and its user attrs."""
    params: dict[str, Any] = {f.name: f.label(v) for f, (_, v) in zip(spec.factors,
                                                                      run.cell.assignment)}
    return params, {  # the seed is a user attr, not a param: it is no hyperparameter
        "enqueue_id": uuid.uuid4().hex,  # lets a retried enqueue find itself instead of doubling
        "run_key": run.run_key, "cell_id": run.cell.cell_id,
        "cell": run.cell.label(spec.factors), "roles": ",".join(run.cell.roles),
        "seed": run.seed, "attempt": attempt, "config": json.dumps(run.config.to_dict())}


def enqueue_run(study: optuna.Study, spec: StudySpec, run: Run, attempt: int) -> None:
    params, attrs = _queue_entry(spec, run, attempt)
    study.enqueue_trial(params, user_attrs=attrs)


def close_orphans(study: optuna.Study, tracker: StudyTracker) -> int:
    """Mark KILLED the MLflow runs left RUNNING by attempts whose trial is no longer running
    (e.g. the tracking store was down when the attempt failed). Best effort; returns how many."""
    try:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        orphans = [rid for rid, number in tracker.running_runs() if number not in running]
    except Exception:  # noqa: BLE001 - cosmetic: the analysis ignores RUNNING runs anyway
        return 0
    for run_id in orphans:
        tracker.mark_lost(run_id, "left RUNNING by a failed or lost attempt", force=True)
    return len(orphans)


def fail_lost(study: optuna.Study, tracker: Optional[StudyTracker]) -> list[optuna.trial.FrozenTrial]:
    """Fail the trials of workers that stopped beating, and mark their MLflow runs KILLED."""
    lost = stale_trials(study)
    if tracker is not None:
        for t in lost:
            # by tag, not by the trial's mlflow_run_id: a worker killed just after creating its
            # MLflow run has not recorded the id on the trial yet
            for run_id in tracker.running_runs_of_trial(t.number):
                tracker.mark_lost(run_id, t.user_attrs.get("error", "worker lost"))
    return lost


def reconcile(study: optuna.Study, spec: StudySpec, plan: list[Run],
              tracker: Optional[StudyTracker] = None) -> QueueState:
    """Fail stale trials, then enqueue every run that is neither done, queued nor given up.

    Call under queue_lock: two workers reconciling at once would both enqueue a missing run.
    """
    fail_lost(study, tracker)
    by_key = _trials_by_key(study)
    state = QueueState()
    entries = []
    for run in plan:
        ts = by_key.get(run.run_key, [])
        if any(t.state == TrialState.COMPLETE for t in ts):
            state.done.append(run.run_key)
        elif any(t.state == TrialState.RUNNING for t in ts):
            state.running.append(run.run_key)
        elif any(t.state == TrialState.WAITING for t in ts):
            state.queued.append(run.run_key)
        elif _attempts(ts) > spec.retries:
            state.gave_up.append(run.run_key)
        else:
            entries.append(_queue_entry(spec, run, attempt=_attempts(ts) + 1))
            state.enqueued.append(run.run_key)
    # in one transaction: one by one, a 10 000-run design took minutes (storage.enqueue_trials)
    rdb(study._storage).enqueue_trials(study._study_id, entries)
    return state


# ------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker process needs (picklable)."""

    spec: StudySpec
    storage_url: str
    tracking_uri: str
    parent_run_id: Optional[str]
    deadline: Optional[float] = None  # time.time() after which no new run starts
    threads: Optional[int] = None  # torch threads (workers on one machine split the cores)
    device: Optional[str] = None  # overrides every run's `device` (e.g. cuda:1), not its identity
    wait: bool = True  # with nothing queued, wait for runs in flight elsewhere (re-run if lost)
    announce_wait: bool = True  # say so (not for local workers: siblings finishing is normal)


class Heartbeat:
    """Records the trial's heartbeat every CHORUS_HEARTBEAT_S seconds while a run trains."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.interval = heartbeat_s()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
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


def __getattr__(name: str) -> Any:
    """`execute.train` is model.train.train, imported (with torch) on first use: `status` and
    the queue do not need torch (PEP 562; tests replace it with monkeypatch)."""
    if name == "train":
        from model.train import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _train() -> Callable[..., TrainResult]:
    return globals().get("train") or __getattr__("train")


def objective_value(spec: StudySpec, res: TrainResult) -> float:
    v = res.outcome()[spec.objective_metric]
    return v if math.isfinite(v) else spec.diverged_value()


def _train_logged(ctx: WorkerContext, tracker: StudyTracker, trial: optuna.Trial, cfg: TrainConfig,
                  cell: Cell, seed: int, run_key: str) -> tuple[TrainResult, str]:
    """Train one run with its MLflow child run; the child is failed/killed on any exception."""
    from ablations.tracking import run_name, run_note, run_tags

    spec = ctx.spec
    if ctx.device:  # where it runs is not what it is: the run key was made from the study's config
        cfg = dataclasses.replace(cfg, device=ctx.device)
    child = tracker.start_child(ctx.parent_run_id, run_name(spec, cell, seed), cfg, tags=run_tags(
        spec, cell, seed, run_key, trial.number, WORKER_ID, trial.user_attrs.get("attempt", 1)))
    trial.set_user_attr("mlflow_run_id" if spec.design != "search" else f"mlflow_run_id.{seed}",
                        child.run_id)
    try:
        res = _train()(cfg, log=child.log)
        child.finish(res, extra_tags={"mlflow.note.content": run_note(spec, cell, seed, cfg, res)},
                     spec=spec)
    except KeyboardInterrupt:
        child.fail("interrupted (Ctrl-C / SIGTERM); the run was re-queued", status="KILLED")
        raise
    except BaseException as e:
        if not is_outage(e):  # (with the store down, marking the run would wait on it again;
            child.fail(traceback.format_exc())  # the next launch closes the run instead)
        raise
    return res, child.run_id


def _tell_failed(study: optuna.Study, trial: optuna.Trial, tb: str, interrupted: bool) -> None:
    trial.set_user_attr("interrupted", interrupted)
    trial.set_user_attr("error", tb[-8000:])
    study.tell(trial, state=TrialState.FAIL)


def run_grid_trial(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                   trial: optuna.Trial) -> dict[str, Any]:
    """Execute one enqueued run. Returns the trial's user attrs (for progress)."""
    spec = ctx.spec
    attrs = dict(trial.user_attrs)
    for f in spec.factors:  # record the fixed factor values as Optuna params
        trial.suggest_categorical(f.name, [f.label(v) for v in f.values])
    cfg = _config(attrs["config"])
    by_name = {f.name: f for f in spec.factors}
    cell = Cell(tuple((name, _value_of(by_name[name], label))
                      for name, label in ((f.name, trial.params[f.name]) for f in spec.factors)),
                tuple(r for r in attrs.get("roles", "").split(",") if r))
    child_run = None
    try:
        res, child_run = _train_logged(ctx, tracker, trial, cfg, cell, attrs["seed"],
                                       attrs["run_key"])
    except KeyboardInterrupt:
        _tell_failed(study, trial, "interrupted", interrupted=True)
        _requeue(study, trial, attrs, crashed=False)
        raise
    except Exception as e:
        tb = traceback.format_exc()
        if is_outage(e):
            _stop_for_outage(study, trial, tb, e, lambda: _requeue(study, trial, attrs, crashed=False))
        _tell_failed(study, trial, tb, interrupted=False)
        if attrs["attempt"] <= spec.retries:
            _requeue(study, trial, attrs, crashed=True)
        attrs.update(status="crashed", error=tb.strip().splitlines()[-1])
        return attrs
    value = objective_value(spec, res)
    outcome = {"status": res.status, "objective": value, "wall_time_s": res.wall_time_s,
               "first_nonfinite_step": res.first_nonfinite_step,
               "first_nonfinite_where": res.first_nonfinite_where,
               **{f"outcome.{k}": v for k, v in res.outcome().items()}}
    for k, v in outcome.items():
        trial.set_user_attr(k, v)
    attrs.update(outcome)
    # MLflow FINISHED first, then the trial COMPLETE: a run that is COMPLETE in Optuna is always
    # counted in MLflow. If the tell fails, the MLflow run is un-finished again (below) or, if
    # this worker dies first, the run is re-run and the analysis keeps one FINISHED run per key.
    try:
        tracker.finish_run(child_run)
    except Exception as e:
        if is_outage(e):
            _stop_for_outage(study, trial, traceback.format_exc(), e,
                             lambda: _requeue(study, trial, attrs, crashed=False))
        raise
    try:
        study.tell(trial, value)
    except UpdateFinishedTrialError:
        # Declared lost (no heartbeat within the grace period: a stalled machine or network) and
        # already re-queued; the re-run will be the counted one.
        tracker.mark_lost(child_run, "finished after the trial was declared lost and re-queued",
                          force=True)
        attrs.update(status="crashed", error="trial declared lost before it finished; re-queued")
    except BaseException:
        tracker.mark_lost(child_run, "its Optuna trial could not be completed", force=True)
        raise
    return attrs


def is_outage(e: BaseException) -> bool:
    """The stores failed (retries spent), not the run: a storage or tracking outage."""
    from ablations.tracking import tracking_transient

    return is_transient(e) or tracking_transient(e)


def _stop_for_outage(study: optuna.Study, trial: optuna.Trial, tb: str, e: BaseException,
                     requeue: Callable[[], None]) -> None:
    """Re-queue the run without using up one of its retries, then stop this worker: with a store
    down, every next run would fail the same way and burn its retries too. If the Optuna storage
    itself is down, the trial stays RUNNING and is re-queued once its heartbeat goes stale."""
    with contextlib.suppress(Exception):
        _tell_failed(study, trial, tb, interrupted=True)
        requeue()
    raise StoreUnavailable(f"a store is unreachable, retries spent ({describe_error(e)}); the run in "
                           f"flight was re-queued and this worker stopped: start it again once "
                           f"the store is back") from e


def _requeue(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any], crashed: bool) -> None:
    """Queue the run again with the same fixed params; only a crash counts as a new attempt."""
    keep = ("run_key", "cell_id", "cell", "roles", "seed", "config")
    study.enqueue_trial(dict(trial.params), user_attrs={
        **{k: attrs[k] for k in keep}, "enqueue_id": uuid.uuid4().hex,
        "attempt": attrs["attempt"] + (1 if crashed else 0)})


def _value_of(factor, label: str) -> Any:
    for v in factor.values:
        if factor.label(v) == label:
            return v
    raise KeyError(label)


def _config(config_json: str) -> TrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HighLearningRateWarning)
        return TrainConfig.from_overrides(json.loads(config_json))


def run_search_trial(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                     trial: optuna.Trial) -> dict[str, Any]:
    """A search trial: sample a cell, train it at every seed, value = mean objective over seeds."""
    spec = ctx.spec
    assignment = []
    for f in spec.factors:
        if f.range is None:
            label = trial.suggest_categorical(f.name, [f.label(v) for v in f.values])
            assignment.append((f.name, _value_of(f, label)))
        elif f.range.integer:
            assignment.append((f.name, trial.suggest_int(f.name, int(f.range.low), int(f.range.high),
                                                         log=f.range.log)))
        else:
            assignment.append((f.name, trial.suggest_float(f.name, f.range.low, f.range.high,
                                                           log=f.range.log)))
    cell = Cell(tuple(assignment))
    attrs: dict[str, Any] = {"cell_id": cell.cell_id, "cell": cell.label(spec.factors),
                             "seed": "all", "attempt": 1}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    values, statuses, wall = [], [], 0.0
    try:
        for seed in spec.seeds:
            cfg = designs.resolve(spec, cell, seed)
            res, child = _train_logged(ctx, tracker, trial, cfg, cell, seed, designs.config_key(cfg))
            tracker.finish_run(child)
            values.append(objective_value(spec, res))
            statuses.append(res.status)
            wall += res.wall_time_s
    except KeyboardInterrupt:
        _tell_failed(study, trial, "interrupted", interrupted=True)
        raise
    except Exception as e:
        tb = traceback.format_exc()
        if is_outage(e):  # a search trial is not re-queued: the sampler proposes another
            _stop_for_outage(study, trial, tb, e, lambda: None)
        _tell_failed(study, trial, tb, interrupted=False)
        attrs.update(status="crashed", error=tb.strip().splitlines()[-1])
        return attrs
    value = statistics.fmean(values)
    status = max(set(statuses), key=statuses.count) if len(set(statuses)) == 1 else "mixed"
    outcome = {"status": status, "statuses": ",".join(statuses), "objective": value,
               "seed_values": values, "wall_time_s": wall,
               "diverged_runs": statuses.count("diverged")}
    for k, v in outcome.items():
        trial.set_user_attr(k, v)
    study.tell(trial, value)
    attrs.update(outcome)
    return attrs


def _search_budget_left(study: optuna.Study, spec: StudySpec) -> bool:
    """Trials left to sample: `trials` live ones, and each slot gets 1 + `retries` attempts."""
    trials = study.get_trials(deepcopy=False)
    live = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
               for t in trials)
    crashed = _attempts(trials)
    return live < (spec.trials or 0) and crashed < (spec.trials or 0) * (1 + spec.retries)


def _pop(study: optuna.Study) -> Optional[int]:
    """Optuna's pop (Study._pop_waiting_trial_id: WAITING -> RUNNING, no sampling), but with the
    trial's heartbeat recorded *before* it turns RUNNING. Optuna never declares a RUNNING trial
    without any heartbeat stale, so a worker killed between the pop and its first beat would
    leave its run RUNNING forever; a beat on a WAITING trial is harmless (only RUNNING trials
    are checked, and the next claimer beats again). The oldest waiting trials are found by one
    query (storage.waiting_trial_ids), not by reading every trial as Optuna's pop does."""
    storage = study._storage
    beat = bool(rdb(storage).heartbeat_interval)
    while True:
        waiting = waiting_trial_ids(storage, study._study_id)
        for trial_id in waiting:
            if beat:
                storage.record_heartbeat(trial_id)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    adopt_trial(storage, study._study_id, trial_id)
                    return trial_id
            except UpdateFinishedTrialError:  # finished by someone else meanwhile
                continue
        if not waiting:
            return None


def _claim(study: optuna.Study, spec: StudySpec, plan_keys: set[str]) -> Optional[optuna.Trial]:
    """Pop a waiting trial that is a run of this plan, not done and not running elsewhere.

    Under queue_lock, so the check and the claim are one step for every worker on every machine.
    """
    storage = study._storage
    with queue_lock(storage, spec.name):
        while True:
            trial_id = _pop(study)
            if trial_id is None:
                return None
            try:
                trial = optuna.Trial(study, trial_id)
                if spec.design == "search":
                    return trial
                key = trial.user_attrs.get("run_key")
                others = [state for tid, state in trial_states_by_user_attr(
                    storage, study._study_id, "run_key", key).items() if tid != trial_id]
                why = ("not a run of the current study file" if key not in plan_keys else
                       "this run already has a COMPLETE trial"
                       if TrialState.COMPLETE in others else
                       "this run is already running in another worker"
                       if TrialState.RUNNING in others else None)
                if not why:
                    trial.set_user_attr("worker", WORKER_ID)  # `status` shows who runs what
                    return trial
                trial.set_user_attr("skipped", why)  # never run or count a run twice
                trial.set_user_attr("interrupted", True)  # not a crash: does not use up a retry
                study.tell(trial, state=TrialState.FAIL)
            except KeyboardInterrupt:  # popped (RUNNING), not yet in a run's handler
                _release(study, spec, trial_id)
                raise


def work(ctx: WorkerContext, on_done: Callable[[dict[str, Any]], None] | None = None,
         out=sys.stdout) -> int:
    """Pop and execute runs until none is left (or the deadline passes). Returns runs executed.

    With nothing queued, a worker re-queues the runs of lost workers (stale heartbeats) and, if
    `ctx.wait`, waits while other workers still have runs in flight, so a run whose worker is
    killed is re-run by a survivor instead of waiting for the next launch.
    """
    from ablations.tracking import StudyTracker

    if ctx.threads:
        import torch

        torch.set_num_threads(ctx.threads)
    storage = open_storage(ctx.storage_url)
    study = load_study(ctx.spec, storage)
    tracker = StudyTracker(ctx.tracking_uri, ctx.spec.name)
    plan = plan_of(ctx.spec)
    plan_keys = {r.run_key for r in plan}
    n, waiting_since = 0, None
    trial = None
    try:
        while ctx.deadline is None or time.time() < ctx.deadline:
            trial = None
            trial = _claim(study, ctx.spec, plan_keys)
            if trial is None and ctx.spec.design == "search":
                fail_lost(study, tracker)
                if _search_budget_left(study, ctx.spec):
                    trial = study.ask()
            if trial is None:
                if ctx.spec.design == "search":
                    in_flight = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
                else:
                    with queue_lock(storage, ctx.spec.name):
                        state = reconcile(study, ctx.spec, plan, tracker)
                    if state.enqueued:
                        print(f"re-queued {len(state.enqueued)} run(s) of lost workers", file=out,
                              flush=True)
                        continue
                    in_flight = len(state.pending)
                if not (ctx.wait and in_flight):
                    break
                if ctx.announce_wait and (waiting_since is None or time.time() - waiting_since > 60):
                    print(f"waiting: {in_flight} run(s) in flight in other workers (re-run here if "
                          f"their worker is lost)", file=out, flush=True)
                    waiting_since = time.time()
                time.sleep(min(heartbeat_s(), 5))
                continue
            waiting_since = None
            with Heartbeat(storage, trial._trial_id):
                if ctx.spec.design == "search":
                    attrs = run_search_trial(ctx, study, tracker, trial)
                else:
                    attrs = run_grid_trial(ctx, study, tracker, trial)
            n += 1
            if on_done:
                on_done(attrs)
    except KeyboardInterrupt:  # between a claim and the run's own handler
        _release(study, ctx.spec, trial._trial_id if trial is not None else None)
        raise
    return n


def _release(study: optuna.Study, spec: StudySpec, trial_id: Optional[int]) -> None:
    """An interrupt (Ctrl-C, SIGTERM) between a claim and the run's own handler: the claimed
    trial is failed as interrupted and its run re-queued, so nothing is left RUNNING."""
    if trial_id is None:
        return
    frozen = study._storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return  # the run's handler has dealt with it
    _tell_failed(study, optuna.Trial(study, trial_id), "interrupted", interrupted=True)
    attrs = frozen.user_attrs
    if spec.design != "search" and "run_key" in attrs:
        keep = ("run_key", "cell_id", "cell", "roles", "seed", "config")
        study.enqueue_trial(dict(frozen.system_attrs.get("fixed_params") or frozen.params),
                            user_attrs={**{k: attrs[k] for k in keep if k in attrs},
                                        "enqueue_id": uuid.uuid4().hex,
                                        "attempt": attrs.get("attempt", 1)})


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker_process(ctx: WorkerContext) -> None:
    """Entry point of a local worker process (spawned by `launch`)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    warnings.simplefilter("ignore")
    try:
        work(ctx)
    except KeyboardInterrupt:
        sys.exit(130)
    except StoreUnavailable as e:
        print(f"worker {WORKER_ID}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ------------------------------------------------------------------------------ launch
@dataclass
class LaunchResult:
    total: int
    done: int
    gave_up: int
    interrupted: bool
    parent_run_id: str
    experiment_id: str
    summary: list[dict[str, Any]]


class Progress:
    """One line per finished run, with done/total, diverged so far and an ETA.

    `done_fn` (a worker among others): read the study-wide done count from the store, so the
    count and the ETA cover every worker's runs, not just this one's.
    """

    def __init__(self, total: int, already: int, workers: int, out=sys.stdout,
                 done_fn: Optional[Callable[[], int]] = None):
        self.total, self.done, self.workers, self.out = total, already, workers, out
        self.done_fn, self.start = done_fn, already
        self.diverged = self.crashed = 0
        self.t0 = time.time()
        self.new = 0

    def __call__(self, attrs: dict[str, Any]) -> None:
        status = attrs.get("status", "?")
        if status == "crashed":
            self.crashed += 1
        else:
            self.done += 1
            self.new += 1
        if self.done_fn is not None:
            with contextlib.suppress(Exception):  # progress is not worth failing a run over
                self.done = self.done_fn()
        self.diverged += status == "diverged" or int(attrs.get("diverged_runs", 0) or 0) > 0
        elapsed = time.time() - self.t0
        left = self.total - self.done
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = f"{_fmt_s(left / rate)}" if rate > 0 and left > 0 else "-"
        obj = attrs.get("objective")
        obj_s = f"{obj:.3f}" if isinstance(obj, float) and math.isfinite(obj) else str(obj)
        detail = attrs.get("error", "") if status == "crashed" else f"objective {obj_s}"
        print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {attrs.get('cell')} | seed "
              f"{attrs.get('seed')}: {status} {detail}  (diverged {self.diverged}, crashed "
              f"{self.crashed}, ETA {eta})", file=self.out, flush=True)


def count_done(study: optuna.Study, spec: StudySpec, keys: Optional[set[str]] = None) -> int:
    """Runs of the plan with a COMPLETE trial (search: COMPLETE trials). Pass the plan's run
    keys when calling it repeatedly: making the plan hashes every run's config."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if spec.design == "search":
        return len(complete)
    keys = keys if keys is not None else {r.run_key for r in plan_of(spec)}
    return len({t.user_attrs.get("run_key") for t in complete} & keys)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plan_of(spec: StudySpec) -> list[Run]:
    return [] if spec.design == "search" else designs.runs(spec)


def launch(spec: StudySpec, storage_url: str = DEFAULT_STORAGE,
           tracking_uri: str = DEFAULT_TRACKING, workers: int = 1,
           out=sys.stdout, device: Optional[str] = None,
           threads: Optional[int] = None) -> LaunchResult:
    """Create/resume the study, enqueue what is missing, run it with `workers` local processes."""
    from ablations.tracking import StudyTracker

    _check_tracking(tracking_uri)
    storage, study = _open_study(spec, storage_url, create=True)
    if study.direction.name.lower() != spec.direction:
        raise StoreError(f"{spec.source}: objective.direction is {spec.direction} but study "
                         f"{spec.name!r} in {safe_url(storage_url)} was created with "
                         f"{study.direction.name.lower()}; use another name or storage")
    plan = plan_of(spec)
    tracker = StudyTracker(tracking_uri, spec.name)
    with queue_lock(storage, spec.name):
        state = reconcile(study, spec, plan, tracker)
    close_orphans(study, tracker)
    total = spec.trials if spec.design == "search" else len(plan)
    already = (len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
               if spec.design == "search" else len(state.done))

    desc = spec.description or f"Ablation study {spec.name}"
    if spec.design == "fractional_factorial":
        desc += "\n\nDesign: " + designs.describe_fraction(spec.design_factors, spec.fraction)
    exp_tags = {"study.design": spec.design, "study.source": spec.source,
                "optuna.storage": safe_url(storage_url)}
    if spec.stress_factors:  # the analysis reads which factors are the stress axis from here
        exp_tags["study.stress"] = ",".join(f.name for f in spec.stress_factors)
    experiment_id = tracker.ensure_experiment(desc, exp_tags)
    tracker.close_stale_launches()
    parent = tracker.start_launch(
        f"{spec.name} launch {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"study": spec.name, "design": spec.design, "optuna_storage": safe_url(storage_url)},
        params={"design": spec.design, "factors": ",".join(f.name for f in spec.factors),
                "seeds": json.dumps(list(spec.seeds)), "baseline": spec.baseline,
                "base": json.dumps(spec.base), "objective": f"{spec.objective_metric} "
                                                             f"({spec.direction})",
                "runs_total": total, "workers": workers})
    print(f"study {spec.name}: {spec.design}, {len(spec.design_factors)} factors"
          + (f" x stress {', '.join(f.name for f in spec.stress_factors)}"
             if spec.stress_factors else "") + ", "
          f"{total} {'trials' if spec.design == 'search' else 'runs'} "
          f"({already} done, {len(state.running)} in flight elsewhere, "
          f"{len(state.queued) + len(state.enqueued)} queued, {len(state.gave_up)} given up); "
          f"{workers} worker(s)", file=out, flush=True)

    deadline = time.time() + spec.minutes * 60 if spec.minutes else None
    ctx = WorkerContext(spec, storage_url, tracking_uri, parent, deadline,
                        threads=threads or threads_per_worker(workers), device=device,
                        announce_wait=False)
    progress = Progress(total, already, workers, out)
    interrupted = False
    try:
        if workers == 0:  # queue only: workers join with `runner.py worker`, here or elsewhere
            print(f"queued; start workers (any machine that reaches both stores): python runner.py "
                  f"worker {spec.source} --storage {safe_url(storage_url)} --tracking-uri {safe_url(tracking_uri)}",
                  file=out, flush=True)
        elif workers == 1:
            work(worker_context(ctx, 0), on_done=progress, out=out)
        else:
            _run_processes(ctx, workers, study, progress)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: finished runs are kept, the runs in flight were re-queued; run the "
              "same command again to resume", file=out, flush=True)

    # Runs that crashed past their retries, and the summary, from the store itself.
    by_key = _trials_by_key(study)
    if spec.design == "search":
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        done, gave_up = len(complete), 0
    else:
        done = sum(any(t.state == TrialState.COMPLETE for t in by_key.get(r.run_key, []))
                   for r in plan)
        gave_up = sum(_attempts(by_key.get(r.run_key, [])) > spec.retries and
                      not any(t.state == TrialState.COMPLETE for t in by_key.get(r.run_key, []))
                      for r in plan)
    summary = summarize(study, spec)
    from ablations.tracking import launch_note

    tracker.end_launch(parent, "KILLED" if interrupted else
                       "FINISHED" if done >= total or workers == 0 else "FAILED",
                       {"runs_done": float(done), "runs_total": float(total),
                        "runs_given_up": float(gave_up)},
                       note=launch_note(spec.name, done, total, gave_up, interrupted))
    return LaunchResult(total, done, gave_up, interrupted, parent, experiment_id, summary)


def worker_context(ctx: WorkerContext, i: int) -> WorkerContext:
    """Local worker i's context: with --device cuda:0,cuda:1 the workers take the devices in
    turn (worker i gets device i mod n)."""
    if not ctx.device or "," not in ctx.device:
        return ctx
    devices = ctx.device.split(",")
    return dataclasses.replace(ctx, device=devices[i % len(devices)])


def _check_tracking(tracking_uri: str) -> None:
    from ablations.tracking import check_reachable

    try:
        check_reachable(tracking_uri)
    except Exception as e:
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: cannot reach the tracking store "
                         f"({describe_error(e)})") from None


def _open_study(spec: StudySpec, storage_url: str,
                create: bool) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """Open (or with `create`, create) the study; one-line StoreErrors. Opening an existing
    study never leaves an empty SQLite database behind where there was none."""
    if not create and storage_url.startswith("sqlite:///") and \
            not os.path.exists(storage_url[len("sqlite:///"):]):
        raise StoreError(f"study {spec.name!r} not found: {safe_url(storage_url)} does not exist; "
                         f"start it with `python runner.py run {spec.source}` first")
    try:
        storage = open_storage(storage_url)
        return storage, load_study(spec, storage, create=create)
    except StoreError:
        raise
    except KeyError:
        raise StoreError(f"study {spec.name!r} not found in {safe_url(storage_url)}; start it with "
                         f"`python runner.py run {spec.source} --storage {safe_url(storage_url)}` first") from None
    except Exception as e:
        raise StoreError(f"--storage {safe_url(storage_url)}: cannot open the Optuna storage "
                         f"({describe_error(e)})") from None


def threads_per_worker(workers: int) -> int:
    """Workers on one machine split its cores (torch oversubscribed is 10x slower, measured)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def join(spec: StudySpec, storage_url: str, tracking_uri: str, device: Optional[str] = None,
         threads: Optional[int] = None, wait: bool = True) -> WorkerContext:
    """A worker joining a launched study (any machine): every store is checked before training,
    and its runs are nested under the study's latest launch in the MLflow UI."""
    from ablations.tracking import StudyTracker

    _open_study(spec, storage_url, create=False)
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: no such MLflow store; use the tracking "
                         f"URI the study was launched with")
    _check_tracking(tracking_uri)
    tracker = StudyTracker(tracking_uri, spec.name)
    if tracker.experiment_id is None:
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: no MLflow experiment {spec.name!r}; use "
                         f"the tracking URI the study was launched with")
    launches = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'launch'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
    return WorkerContext(spec, storage_url, tracking_uri,
                         parent_run_id=launches[0].info.run_id if launches else None,
                         threads=threads, device=device, wait=wait)


def _run_processes(ctx: WorkerContext, workers: int, study: optuna.Study,
                   progress: Callable[[dict[str, Any]], None]) -> None:
    """N local workers: this process and N-1 spawned ones; progress comes from polling the store.

    This process works too because it is warm (torch, MLflow and Optuna imported): a spawned
    worker spends 5-10 s importing and opening the stores before its first run, which is a
    large share of a small study (benchmarks/worker_scaling.py). (Starting it as the launch
    starts, so that its imports overlap the launch's set-up, was tried and measured: on a busy
    2-core machine it delayed the launching process's first run more than it brought the spawned
    worker's forward; benchmarks/startup.py.)
    """
    mp = multiprocessing.get_context("spawn")  # fork is unsafe after torch/CUDA/SQLite set-up
    procs = [mp.Process(target=_worker_process, args=(worker_context(ctx, i),), daemon=False)
             for i in range(1, workers)]
    ctx = worker_context(ctx, 0)
    seen = set(finished_trial_ids(study._storage, study._study_id))
    lock, stop = threading.Lock(), threading.Event()
    with child_env():  # their OpenMP threads sleep when idle (ablations/torch_setup.py)
        for p in procs:
            p.start()

    def poll() -> None:
        with lock:  # (not get_trials: it re-reads every queued trial, seconds for big designs)
            for trial_id in finished_trial_ids(study._storage, study._study_id):
                if trial_id not in seen:
                    seen.add(trial_id)
                    t = study._storage.get_trial(trial_id)
                    if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
                        continue
                    attrs = dict(t.user_attrs)
                    if t.state == TrialState.FAIL:
                        lines = str(attrs.get("error", "")).strip().splitlines()
                        attrs.update(status="crashed", error=lines[-1] if lines else "")
                    progress(attrs)

    def poller() -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(Exception):  # a missed progress line is not worth dying for
                poll()

    watcher = threading.Thread(target=poller, daemon=True)
    watcher.start()
    try:
        work(ctx)  # progress lines come from the poller, for this process's runs too
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C reaches them too; `kill parent` does not. SIGTERM,
            if p.is_alive():  # not SIGINT: a shell starts background jobs with SIGINT ignored
                p.terminate()
        for p in procs:
            p.join(timeout=60)
        raise
    finally:
        stop.set()
        watcher.join()
        poll()


# ------------------------------------------------------------------------------ reading
def summarize(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """Per cell: runs, status counts, objective mean and sd (current plan's runs only)."""
    keys = {r.run_key for r in plan_of(spec)}
    cells: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if spec.design != "search" and t.user_attrs.get("run_key") not in keys:
            continue
        c = cells.setdefault(t.user_attrs.get("cell", "?"), {"cell": t.user_attrs.get("cell", "?"),
                                                            "runs": 0, "values": [],
                                                            "statuses": {}})
        # A search trial is one cell at every seed: count its runs, and spread over its seeds.
        statuses = str(t.user_attrs.get("statuses", t.user_attrs.get("status", "?"))).split(",")
        c["runs"] += len(statuses)
        c["values"].extend(t.user_attrs.get("seed_values") or [t.value])
        for s in statuses:
            c["statuses"][s] = c["statuses"].get(s, 0) + 1
    out = []
    for c in cells.values():
        vals = [v for v in c["values"] if v is not None and math.isfinite(v)]
        c["mean"] = statistics.fmean(vals) if vals else float("nan")
        c["sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(c)
    reverse = spec.direction == "maximize"
    return sorted(out, key=lambda c: (-c["mean"] if reverse else c["mean"]) if math.isfinite(c["mean"])
                  else math.inf)


def study_status(spec: StudySpec, storage_url: str) -> dict[str, Any]:
    """Done / running / failed / queued counts, diverged count and an ETA, from the store."""
    _, study = _open_study(spec, storage_url, create=False)
    stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    diverged = sum(t.user_attrs.get("status") == "diverged" or
                   int(t.user_attrs.get("diverged_runs", 0) or 0) > 0 for t in complete)
    plan = plan_of(spec)
    total = spec.trials if spec.design == "search" else len(plan)
    by_key = _trials_by_key(study)
    gave_up = 0 if spec.design == "search" else sum(
        _attempts(by_key.get(r.run_key, [])) > spec.retries and
        not any(t.state == TrialState.COMPLETE for t in by_key.get(r.run_key, []))
        for r in plan)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete
                 if t.datetime_complete and t.datetime_start]
    left = max(0, (total or 0) - len(complete) - gave_up)
    parallel = max(1, count[TrialState.RUNNING])
    # no finished run to time yet: no estimate (None), rather than a misleading 0
    eta = (statistics.fmean(durations) * left / parallel if durations else None) if left else 0.0
    now = datetime.datetime.now()  # Optuna stamps trials with the worker's local time
    in_flight = [{"cell": t.user_attrs.get("cell", "?"), "seed": t.user_attrs.get("seed", "?"),
                  "worker": t.user_attrs.get("worker", "?"),
                  "running_s": (now - t.datetime_start).total_seconds() if t.datetime_start else None}
                 for t in trials if t.state == TrialState.RUNNING]
    return {"study": spec.name, "total": total, "done": len(complete),
            "running": count[TrialState.RUNNING], "queued": count[TrialState.WAITING],
            "failed_attempts": count[TrialState.FAIL], "given_up": gave_up,
            "diverged": diverged, "eta_s": eta, "in_flight": in_flight}
