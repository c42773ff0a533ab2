"""The queue: every run of a study enqueued once, workers claim runs, where every run stands.

Why not Optuna's GridSampler: under several workers it silently skips and duplicates grid
points. Instead the launcher enqueues every run (cell x seed) as a fixed trial, once; workers
only *claim* waiting trials (never ask the sampler for new ones), so each run executes once.

  * a diverged or collapsed run is a result: its trial is COMPLETE, never retried;
  * an exception marks the trial FAIL with its traceback and re-enqueues the run, at most
    `retries` times;
  * Ctrl-C (or SIGTERM) marks the run in flight FAIL/"interrupted" and re-enqueues it;
    interrupted attempts do not count as crashes;
  * a worker killed outright leaves its trial RUNNING; its heartbeat stops, and another worker
    (or the next launch) marks it lost (FAIL, its MLflow run KILLED) and re-enqueues the run;
    this counts as a crashed attempt;
  * running the same command again resumes: runs with a COMPLETE trial are never re-run.

Search designs (TPE / random) are the exception to "enqueue everything": with nothing queued a
worker asks the sampler for a new trial (`refill`), while the study's budget of trials lasts.
`plan_state` answers where every run stands, for the launcher, the workers and `status`.
The storage side (one-query reads, the bulk insert, the lock, Optuna's private handles) is
ablations/engine/storage.py.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ablations.design import identity
from ablations.design.designs import PlannedRun
from ablations.design.spec import StudySpec
from ablations.engine.storage import (RetryingRDBStorage, adopt_trial, handles, queue_lock, rdb, stale_trials, trial_id_of,
                               trial_states_by_user_attr, waiting_trial_ids)
from ablations.engine.study import Plan

if TYPE_CHECKING:  # imported where used: `status` and the queue need neither torch nor MLflow
    from ablations.tracking.tracker import StudyTracker

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # recorded on every claim and MLflow run


# ------------------------------------------------------------------------ where runs stand
@dataclass
class PlanState:
    """Where every run of the plan stands, from the study's trials: run keys (a search design:
    trial numbers, as text)."""

    done: list[str] = field(default_factory=list)  # a COMPLETE trial
    running: list[str] = field(default_factory=list)  # RUNNING (a worker's, maybe a lost one's)
    queued: list[str] = field(default_factory=list)  # WAITING
    gave_up: list[str] = field(default_factory=list)  # crashed more than `retries` times
    missing: list[tuple[PlannedRun, int]] = field(default_factory=list)  # none of those: (run, attempt)
    enqueued: list[str] = field(default_factory=list)  # the missing ones, once reconcile queued them

    @property
    def pending(self) -> list[str]:
        """Runs that will finish without being enqueued again: RUNNING or WAITING."""
        return self.running + self.queued


def crashes(trials: list[FrozenTrial]) -> int:
    """Crashed attempts: FAIL trials not caused by an interrupt (stale = a killed worker counts)."""
    return sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))


def plan_state(study: optuna.Study, plan: Plan) -> PlanState:
    """Where every run of the plan stands. A run is done if any of its trials is COMPLETE, else
    running, else queued, else given up once its crashes exceed the retries, else missing."""
    trials = study.get_trials(deepcopy=False)
    state = PlanState()
    if plan.search:  # a trial is a sampled cell: it is its own "run"
        for t in trials:
            where = {TrialState.COMPLETE: state.done, TrialState.RUNNING: state.running,
                     TrialState.WAITING: state.queued}.get(t.state)
            if where is not None:
                where.append(str(t.number))
        return state
    by_key: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        key = t.user_attrs.get("run_key")
        if key:
            by_key.setdefault(key, []).append(t)
    for run in plan:
        ts = by_key.get(run.run_key, [])
        if run.legacy_key != run.run_key:  # done before the device left the key: still done
            ts = ts + by_key.get(run.legacy_key, [])
        states = {t.state for t in ts}
        if TrialState.COMPLETE in states:
            state.done.append(run.run_key)
        elif TrialState.RUNNING in states:
            state.running.append(run.run_key)
        elif TrialState.WAITING in states:
            state.queued.append(run.run_key)
        elif crashes(ts) > plan.spec.retries:
            state.gave_up.append(run.run_key)
        else:
            state.missing.append((run, crashes(ts) + 1))
    return state


# ------------------------------------------------------------------------------ enqueue
def enqueue_run(study: optuna.Study, spec: StudySpec, run: PlannedRun, attempt: int) -> None:
    """One run through Optuna's own enqueue_trial (reconcile queues in bulk instead)."""
    params, attrs = identity.queue_entry(spec, run, attempt)
    study.enqueue_trial(params, user_attrs=attrs)


def reconcile(study: optuna.Study, plan: Plan, tracker: Optional[StudyTracker] = None) -> PlanState:
    """Fail stale trials, then enqueue every run that is neither done, queued nor given up.

    Call under queue_lock: two workers reconciling at once would both enqueue a missing run.
    """
    fail_lost(study, tracker)
    state = plan_state(study, plan)
    entries = [identity.queue_entry(plan.spec, run, attempt) for run, attempt in state.missing]
    storage, study_id = handles(study)
    # in one transaction: one by one, a 10 000-run design took minutes (storage.enqueue_trials)
    rdb(storage).enqueue_trials(study_id, entries)
    state.enqueued = [run.run_key for run, _ in state.missing]
    return state


def requeue(study: optuna.Study, trial: optuna.Trial | FrozenTrial, crashed: bool) -> None:
    """Queue the run again with the same fixed params; only a crash counts as a new attempt."""
    attrs = trial.user_attrs
    params = (trial.system_attrs.get("fixed_params") or trial.params
              if isinstance(trial, FrozenTrial) else trial.params)
    params, attrs = identity.requeue_entry(params, attrs,
                                           attrs.get("attempt", 1) + (1 if crashed else 0))
    study.enqueue_trial(params, user_attrs=attrs)


# ---------------------------------------------------------------------------------- claim
def _pop_one(study: optuna.Study, trial_id: int) -> bool:
    """WAITING -> RUNNING for one trial, its heartbeat recorded *before* it turns RUNNING: Optuna
    never declares a RUNNING trial without any heartbeat stale, so a worker killed between the
    pop and its first beat would leave its run RUNNING forever; a beat on a WAITING trial is
    harmless (only RUNNING trials are checked, and the next claimer beats again)."""
    storage, study_id = handles(study)
    backend = rdb(storage)
    if backend.heartbeat_interval:
        storage.record_heartbeat(trial_id)
    try:
        # (RetryingRDBStorage.pop_trial: a retried pop knows whether it was this one's)
        popped = (backend.pop_trial(trial_id, f"{WORKER_ID}:{uuid.uuid4().hex}")
                  if isinstance(backend, RetryingRDBStorage) else
                  storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
        if popped:
            adopt_trial(storage, study_id, trial_id)
            return True
    except UpdateFinishedTrialError:  # finished by someone else meanwhile
        pass
    return False


def _pop(study: optuna.Study) -> Optional[int]:
    """Optuna's pop (Study._pop_waiting_trial_id: WAITING -> RUNNING, no sampling), with the
    heartbeat first (_pop_one). The oldest waiting trials are found by one query
    (storage.waiting_trial_ids), not by reading every trial as Optuna's pop does."""
    storage, study_id = handles(study)
    while True:
        waiting = waiting_trial_ids(storage, study_id)
        for trial_id in waiting:
            if _pop_one(study, trial_id):
                return trial_id
        if not waiting:
            return None


def _take(study: optuna.Study, plan: Plan, trial_id: int) -> Optional[optuna.Trial]:
    """A popped (RUNNING) trial of a grid plan, if it is a run of this plan, not done and not
    running elsewhere; otherwise it is failed as skipped (never run or count a run twice)."""
    storage, study_id = handles(study)
    trial = optuna.Trial(study, trial_id)
    key = trial.user_attrs.get("run_key")
    others = [state for tid, state in trial_states_by_user_attr(
        storage, study_id, "run_key", key).items() if tid != trial_id]
    why = ("not a run of the current study file" if key not in plan.keys else
           "this run already has a COMPLETE trial"
           if TrialState.COMPLETE in others else
           "this run is already running in another worker"
           if TrialState.RUNNING in others else None)
    if not why:
        trial.set_user_attr("worker", WORKER_ID)  # `status` shows who runs what
        return trial
    trial.set_user_attr("skipped", why)
    trial.set_user_attr("interrupted", True)  # not a crash: does not use up a retry
    study.tell(trial, state=TrialState.FAIL)
    return None


def claim(study: optuna.Study, plan: Plan) -> Optional[optuna.Trial]:
    """Pop a waiting trial that is a run of this plan, not done and not running elsewhere.

    Under queue_lock, so the check and the claim are one step for every worker on every machine.
    """
    storage, _ = handles(study)
    with queue_lock(storage, plan.spec.name):
        while True:
            trial_id = _pop(study)
            if trial_id is None:
                return None
            try:
                if plan.search:
                    return optuna.Trial(study, trial_id)
                trial = _take(study, plan, trial_id)
                if trial is not None:
                    return trial
            except KeyboardInterrupt:  # popped (RUNNING), not yet in a run's handler
                release(study, trial_id)
                raise


def claim_siblings(study: optuna.Study, plan: Plan, first: optuna.Trial,
                   most: int) -> list[optuna.Trial]:
    """Up to `most` more waiting runs of `first`'s cell (its other seeds: the same config but the
    seed), claimed as `claim` does, to train with it as one ensemble (trial.run_grid_trials).
    Found by one query on the cell id, oldest first."""
    storage, study_id = handles(study)
    cell_id = first.user_attrs.get("cell_id")
    same = identity.config_but_seed(first.user_attrs)
    out: list[optuna.Trial] = []
    with queue_lock(storage, plan.spec.name):
        states = trial_states_by_user_attr(storage, study_id, "cell_id", cell_id)
        for trial_id in sorted(t for t, state in states.items() if state == TrialState.WAITING):
            if len(out) >= most:
                break
            if identity.config_but_seed(storage.get_trial(trial_id).user_attrs) != same:
                continue  # (a safeguard: the cell id names every factor's and stress value)
            if not _pop_one(study, trial_id):
                continue
            try:
                trial = _take(study, plan, trial_id)
            except KeyboardInterrupt:  # popped, not yet in a run's handler: give them all back
                for tid in [*map(trial_id_of, out), trial_id]:
                    release(study, tid)
                raise
            if trial is not None:
                out.append(trial)
    return out


def refill(study: optuna.Study, plan: Plan,
           tracker: Optional[StudyTracker]) -> tuple[Optional[optuna.Trial], int, int]:
    """Nothing to claim: (a new trial, runs in flight elsewhere, runs re-queued). A search design
    asks the sampler for a new trial while its budget lasts; a grid design re-queues the runs
    of lost workers (stale heartbeats)."""
    if plan.search:
        fail_lost(study, tracker)
        trials = study.get_trials(deepcopy=False)
        live = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
                   for t in trials)
        budget = plan.spec.trials or 0  # `trials` live ones, each slot 1 + `retries` attempts
        if live < budget and crashes(trials) < budget * (1 + plan.spec.retries):
            return study.ask(), 0, 0
        return None, sum(t.state == TrialState.RUNNING for t in trials), 0
    storage, _ = handles(study)
    with queue_lock(storage, plan.spec.name):
        state = reconcile(study, plan, tracker)
    return None, len(state.pending), len(state.enqueued)


# ----------------------------------------------------------------------- ending an attempt
def tell_failed(study: optuna.Study, trial: optuna.Trial, tb: str, interrupted: bool) -> None:
    trial.set_user_attr("interrupted", interrupted)
    trial.set_user_attr("error", tb[-8000:])
    study.tell(trial, state=TrialState.FAIL)


def release(study: optuna.Study, trial_id: Optional[int]) -> None:
    """An interrupt (Ctrl-C, SIGTERM) between a claim and the run's own handler: the claimed
    trial is failed as interrupted and its run re-queued, so nothing is left RUNNING."""
    if trial_id is None:
        return
    storage, _ = handles(study)
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return  # the run's handler has dealt with it
    tell_failed(study, optuna.Trial(study, trial_id), "interrupted", interrupted=True)
    if "run_key" in frozen.user_attrs:  # a grid run (a search trial is not re-queued)
        requeue(study, frozen, crashed=False)


# ---------------------------------------------------------------------------- lost workers
def fail_lost(study: optuna.Study, tracker: Optional[StudyTracker]) -> list[FrozenTrial]:
    """Fail the trials of workers that stopped beating, and mark their MLflow runs KILLED."""
    lost = stale_trials(study)
    if tracker is not None:
        for t in lost:
            # by tag, not by the trial's mlflow_run_id: a worker killed just after creating its
            # MLflow run has not recorded the id on the trial yet
            for run_id in tracker.running_runs_of_trial(t.number):
                tracker.mark_lost(run_id, t.user_attrs.get("error", "worker lost"))
    return lost


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
