"""Running one claimed trial: train its run(s) with their MLflow runs, then tell Optuna the outcome.

A grid trial is one run (cell x seed, fixed when it was queued). A search trial is one cell the
sampler proposes, trained at every seed (one MLflow run each); its value is the mean objective
over the seeds. How a trial ends:

  * trained (converged, recovered, collapsed or diverged alike): COMPLETE with its objective;
  * an exception: FAIL with the traceback, and a grid run is re-queued while it has retries left;
  * Ctrl-C / SIGTERM: FAIL as interrupted, a grid run re-queued (it does not use up a retry);
  * a store gone past its retries (an outage): the run is re-queued without using up a retry
    and the worker stops with StoreUnavailable, rather than burn every run's retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import traceback
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from ablations import designs, identity
from ablations.designs import Cell
from ablations.queue import WORKER_ID, requeue, tell_failed
from ablations.spec import StudySpec
from ablations.retry import StoreUnavailable, describe_error, is_outage
from model.config import TrainConfig

if TYPE_CHECKING:  # imported where used: `status` and the queue need neither torch nor MLflow
    from ablations.tracking import StudyTracker
    from ablations.worker import WorkerContext
    from model.train import TrainResult


def __getattr__(name: str) -> Any:
    """`trial.train` is model.train.train, imported (with torch) on first use: `status` and
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
                  cell: Cell, seed: int, run_key: str, run_id_attr: str) -> tuple[TrainResult, str]:
    """Train one run with its MLflow child run (its id recorded on the trial as `run_id_attr`);
    the child is failed/killed on any exception."""
    from ablations.tracking import run_name, run_note, run_tags

    spec = ctx.spec
    if ctx.device:  # where it runs is not what it is: the run key was made from the study's config
        cfg = dataclasses.replace(cfg, device=ctx.device)
    child = tracker.start_child(ctx.parent_run_id, run_name(spec, cell, seed), cfg, tags=run_tags(
        spec, cell, seed, run_key, trial.number, WORKER_ID, trial.user_attrs.get("attempt", 1)))
    trial.set_user_attr(run_id_attr, child.run_id)
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


def _stop_for_outage(study: optuna.Study, trial: optuna.Trial, tb: str, e: BaseException,
                     requeue_run: Callable[[], None]) -> None:
    """Re-queue the run without using up one of its retries, then stop this worker: with a store
    down, every next run would fail the same way and burn its retries too. If the Optuna storage
    itself is down, the trial stays RUNNING and is re-queued once its heartbeat goes stale."""
    with contextlib.suppress(Exception):
        tell_failed(study, trial, tb, interrupted=True)
        requeue_run()
    raise StoreUnavailable(f"a store is unreachable, retries spent ({describe_error(e)}); the run in "
                           f"flight was re-queued and this worker stopped: start it again once "
                           f"the store is back") from e


def _crashed(attrs: dict[str, Any], tb: str) -> dict[str, Any]:
    attrs.update(status="crashed", error=tb.strip().splitlines()[-1])
    return attrs


def run_grid_trial(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                   trial: optuna.Trial) -> dict[str, Any]:
    """Execute one enqueued run. Returns the trial's user attrs (for progress)."""
    spec = ctx.spec
    attrs = dict(trial.user_attrs)
    for f in spec.factors:  # record the fixed factor values as Optuna params
        trial.suggest_categorical(f.name, [f.label(v) for v in f.values])
    run = identity.claimed_run(spec, trial.params, attrs)
    child_run = None
    try:
        res, child_run = _train_logged(ctx, tracker, trial, run.config, run.cell, run.seed,
                                       run.run_key, "mlflow_run_id")
    except KeyboardInterrupt:
        tell_failed(study, trial, "interrupted", interrupted=True)
        requeue(study, trial, crashed=False)
        raise
    except Exception as e:
        tb = traceback.format_exc()
        if is_outage(e):
            _stop_for_outage(study, trial, tb, e, lambda: requeue(study, trial, crashed=False))
        tell_failed(study, trial, tb, interrupted=False)
        if attrs["attempt"] <= spec.retries:
            requeue(study, trial, crashed=True)
        return _crashed(attrs, tb)
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
                             lambda: requeue(study, trial, crashed=False))
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


def _sample_cell(spec: StudySpec, trial: optuna.Trial) -> Cell:
    assignment = []
    for f in spec.factors:
        if f.range is None:
            label = trial.suggest_categorical(f.name, [f.label(v) for v in f.values])
            assignment.append((f.name, next(v for v in f.values if f.label(v) == label)))
        elif f.range.integer:
            assignment.append((f.name, trial.suggest_int(f.name, int(f.range.low), int(f.range.high),
                                                         log=f.range.log)))
        else:
            assignment.append((f.name, trial.suggest_float(f.name, f.range.low, f.range.high,
                                                           log=f.range.log)))
    return Cell(tuple(assignment))


def run_search_trial(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                     trial: optuna.Trial) -> dict[str, Any]:
    """A search trial: sample a cell, train it at every seed, value = mean objective over seeds."""
    spec = ctx.spec
    cell = _sample_cell(spec, trial)
    attrs: dict[str, Any] = {"cell_id": cell.cell_id, "cell": cell.label(spec.factors),
                             "seed": "all", "attempt": 1}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    values, statuses, wall = [], [], 0.0
    try:
        for seed in spec.seeds:
            cfg = designs.resolve(spec, cell, seed)
            res, child = _train_logged(ctx, tracker, trial, cfg, cell, seed, designs.config_key(cfg),
                                       f"mlflow_run_id.{seed}")
            tracker.finish_run(child)
            values.append(objective_value(spec, res))
            statuses.append(res.status)
            wall += res.wall_time_s
    except KeyboardInterrupt:
        tell_failed(study, trial, "interrupted", interrupted=True)
        raise
    except Exception as e:
        tb = traceback.format_exc()
        if is_outage(e):  # a search trial is not re-queued: the sampler proposes another
            _stop_for_outage(study, trial, tb, e, lambda: None)
        tell_failed(study, trial, tb, interrupted=False)
        return _crashed(attrs, tb)
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
