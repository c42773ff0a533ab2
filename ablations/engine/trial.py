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

from ablations.design import designs, identity
from ablations.design.designs import Cell
from ablations.engine.queue import WORKER_ID, requeue, tell_failed
from ablations.design.spec import StudySpec
from ablations.engine.context import WorkerContext
from ablations.engine.storage import set_user_attrs
from ablations.tracking.retry import StoreUnavailable, describe_error, is_outage
from model.config import TrainConfig

if TYPE_CHECKING:  # imported where used: `status` and the queue need neither torch nor MLflow
    from ablations.tracking.tracker import StudyTracker
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


def _start_child(ctx: WorkerContext, tracker: StudyTracker, trial: optuna.Trial, cfg: TrainConfig,
                 cell: Cell, seed: int, run_key: str, run_id_attr: str,
                 extra_tags: dict[str, str] | None = None) -> tuple[TrainConfig, Any]:
    """Open the run's MLflow child run (its id recorded on the trial as `run_id_attr`); returns
    the config it trains with (on the worker's device) and the child."""
    from ablations.tracking.tracker import run_name, run_tags

    spec = ctx.spec
    if ctx.device:  # where it runs is not what it is: the run key was made from the study's config
        cfg = dataclasses.replace(cfg, device=ctx.device)
    # How many CPU threads it trained with: the floats' last digits depend on it, its identity
    # does not (ablations/engine/torch_setup.py).
    import torch

    threads = {"threads": str(torch.get_num_threads())}
    child = tracker.start_child(ctx.parent_run_id, run_name(spec, cell, seed), cfg, tags=run_tags(
        spec, cell, seed, run_key, trial.number, WORKER_ID, trial.user_attrs.get("attempt", 1))
        | threads | (extra_tags or {}))
    trial.set_user_attr(run_id_attr, child.run_id)
    return cfg, child


@contextlib.contextmanager
def _children_fail_with(children: list[Any]):
    """Any exception while the runs train or log: their MLflow runs are marked failed (KILLED
    for an interrupt, whose runs are re-queued)."""
    try:
        yield
    except KeyboardInterrupt:
        for child in children:
            child.fail("interrupted (Ctrl-C / SIGTERM); the run was re-queued", status="KILLED")
        raise
    except BaseException as e:
        if not is_outage(e):  # (with the store down, marking the run would wait on it again;
            tb = traceback.format_exc()  # the next launch closes the run instead)
            for child in children:
                child.fail(tb)
        raise


def _finish_child(ctx: WorkerContext, child: Any, cfg: TrainConfig, cell: Cell, seed: int,
                  res: TrainResult) -> None:
    from ablations.tracking.notes import run_links, run_note

    links = run_links(child.experiment_id, cell.cell_id, ctx.parent_run_id)
    child.finish(res, extra_tags={"mlflow.note.content": run_note(ctx.spec, cell, seed, cfg, res,
                                                                  links)},
                 spec=ctx.spec)


def _train_logged(ctx: WorkerContext, tracker: StudyTracker, trial: optuna.Trial, cfg: TrainConfig,
                  cell: Cell, seed: int, run_key: str, run_id_attr: str) -> tuple[TrainResult, str]:
    """Train one run with its MLflow child run; the child is failed/killed on any exception."""
    cfg, child = _start_child(ctx, tracker, trial, cfg, cell, seed, run_key, run_id_attr)
    with _children_fail_with([child]):
        res = _train()(cfg, log=child.log)
        _finish_child(ctx, child, cfg, cell, seed, res)
    return res, child.run_id


def _stop_for_outage(study: optuna.Study, trials: list[optuna.Trial], tb: str, e: BaseException,
                     requeue_run: Callable[[optuna.Trial], None]) -> None:
    """Re-queue the run(s) without using up one of their retries, then stop this worker: with a
    store down, every next run would fail the same way and burn its retries too. If the Optuna
    storage itself is down, the trials stay RUNNING and are re-queued once their heartbeat goes
    stale."""
    for trial in trials:
        with contextlib.suppress(Exception):
            tell_failed(study, trial, tb, interrupted=True)
            requeue_run(trial)
    raise StoreUnavailable(f"a store is unreachable, retries spent ({describe_error(e)}); the run in "
                           f"flight was re-queued and this worker stopped: start it again once "
                           f"the store is back") from e


def _crashed(attrs: dict[str, Any], tb: str) -> dict[str, Any]:
    attrs.update(status="crashed", error=tb.strip().splitlines()[-1])
    return attrs


def _claimed(ctx: WorkerContext, trial: optuna.Trial) -> tuple[dict[str, Any], Any]:
    """A claimed grid trial's user attrs and the run it names (its factor labels recorded as
    Optuna params, for the dashboard's axes)."""
    attrs = dict(trial.user_attrs)
    for f in ctx.spec.factors:
        trial.suggest_categorical(f.name, [f.label(v) for v in f.values])
    return attrs, identity.claimed_run(ctx.spec, trial.params, attrs)


def _ended_badly(ctx: WorkerContext, study: optuna.Study, trials: list[optuna.Trial],
                 attrs: list[dict[str, Any]], e: BaseException) -> list[dict[str, Any]]:
    """The runs of `trials` raised `e` while training or logging: an interrupt re-queues them
    (and propagates), an outage re-queues them and stops the worker, anything else is a crash,
    re-queued while the run has retries left."""
    if isinstance(e, KeyboardInterrupt):
        for trial in trials:
            tell_failed(study, trial, "interrupted", interrupted=True)
            requeue(study, trial, crashed=False)
        raise e
    tb = traceback.format_exc()
    if is_outage(e):
        _stop_for_outage(study, trials, tb, e, lambda t: requeue(study, t, crashed=False))
    for trial, a in zip(trials, attrs):
        tell_failed(study, trial, tb, interrupted=False)
        if a["attempt"] <= ctx.spec.retries:
            requeue(study, trial, crashed=True)
    return [_crashed(a, tb) for a in attrs]


def _complete(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker, trial: optuna.Trial,
              attrs: dict[str, Any], res: TrainResult, child_run: str) -> dict[str, Any]:
    """A trained run: its outcome on the trial, its MLflow run FINISHED, the trial COMPLETE."""
    value = objective_value(ctx.spec, res)
    outcome = {"status": res.status, "objective": value, "wall_time_s": res.wall_time_s,
               "first_nonfinite_step": res.first_nonfinite_step,
               "first_nonfinite_where": res.first_nonfinite_where,
               **{f"outcome.{k}": v for k, v in res.outcome().items()}}
    set_user_attrs(trial, outcome)
    attrs.update(outcome)
    # MLflow FINISHED first, then the trial COMPLETE: a run that is COMPLETE in Optuna is always
    # counted in MLflow. If the tell fails, the MLflow run is un-finished again (below) or, if
    # this worker dies first, the run is re-run and the analysis keeps one FINISHED run per key.
    try:
        tracker.finish_run(child_run)
    except Exception as e:
        if is_outage(e):
            _stop_for_outage(study, [trial], traceback.format_exc(), e,
                             lambda t: requeue(study, t, crashed=False))
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


def run_grid_trial(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                   trial: optuna.Trial) -> dict[str, Any]:
    """Execute one enqueued run. Returns the trial's user attrs (for progress)."""
    attrs, run = _claimed(ctx, trial)
    try:
        res, child_run = _train_logged(ctx, tracker, trial, run.config, run.cell, run.seed,
                                       run.run_key, "mlflow_run_id")
    except (Exception, KeyboardInterrupt) as e:  # an interrupt is re-raised by _ended_badly
        return _ended_badly(ctx, study, [trial], [attrs], e)[0]
    return _complete(ctx, study, tracker, trial, attrs, res, child_run)


def ensemble_size(ctx: WorkerContext, trial: optuna.Trial) -> int:
    """How many runs of this trial's cell to train together as one vectorised ensemble
    (model/ensemble.py): 1 unless `ctx.ensemble` asks for it (`on`, or `auto` on CUDA) and the
    run's config can be vectorised; then up to the study's number of seeds."""
    if ctx.ensemble == "off" or len(ctx.spec.seeds) < 2 or "config" not in trial.user_attrs:
        return 1
    from model.ensemble import ensemble_declines

    cfg = identity.claimed_config(trial.user_attrs, ctx.spec)
    if ctx.device:
        cfg = dataclasses.replace(cfg, device=ctx.device)
    mode = True if ctx.ensemble == "on" else "auto"
    return 1 if ensemble_declines([cfg, cfg], mode) else len(ctx.spec.seeds)


def run_grid_trials(ctx: WorkerContext, study: optuna.Study, tracker: StudyTracker,
                    trials: list[optuna.Trial]) -> list[dict[str, Any]]:
    """Execute enqueued runs of one cell (its seeds) as one vectorised ensemble: each keeps its
    own MLflow run, outcome and trial, exactly as run_grid_trial does for one run. An exception
    while they train ends them all alike (re-queued; a crash uses up one retry of each)."""
    if len(trials) == 1:
        return [run_grid_trial(ctx, study, tracker, trials[0])]
    from model.ensemble import train_ensemble

    claimed = [_claimed(ctx, t) for t in trials]
    attrs = [a for a, _ in claimed]
    children: list[Any] = []
    try:
        with _children_fail_with(children):  # (the children opened so far)
            cfgs = []
            # which runs trained together: their results agree with separate runs within float
            # rounding, not bit for bit (model/ensemble.py)
            together = {"ensemble": ",".join(str(r.seed) for _, r in claimed)}
            for t, (_, run) in zip(trials, claimed):
                cfg, child = _start_child(ctx, tracker, t, run.config, run.cell, run.seed,
                                          run.run_key, "mlflow_run_id", together)
                cfgs.append(cfg)
                children.append(child)
            results = train_ensemble(cfgs, logs=[c.log for c in children], ensemble=True)
            for child, cfg, (_, run), res in zip(children, cfgs, claimed, results):
                _finish_child(ctx, child, cfg, run.cell, run.seed, res)
    except (Exception, KeyboardInterrupt) as e:  # an interrupt is re-raised by _ended_badly
        return _ended_badly(ctx, study, trials, attrs, e)
    return [_complete(ctx, study, tracker, t, a, res, c.run_id)
            for t, a, res, c in zip(trials, attrs, results, children)]


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
            _stop_for_outage(study, [trial], tb, e, lambda t: None)
        tell_failed(study, trial, tb, interrupted=False)
        return _crashed(attrs, tb)
    value = statistics.fmean(values)
    status = max(set(statuses), key=statuses.count) if len(set(statuses)) == 1 else "mixed"
    outcome = {"status": status, "statuses": ",".join(statuses), "objective": value,
               "seed_values": values, "wall_time_s": wall,
               "diverged_runs": statuses.count("diverged")}
    set_user_attrs(trial, outcome)
    study.tell(trial, value)
    attrs.update(outcome)
    return attrs
