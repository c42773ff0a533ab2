"""Launching a study here: create or resume it, queue what is missing, run local workers.

`launch` (`runner.py run`) sets the study up in both stores (the Optuna study and its queue, the
MLflow experiment and a launch run that every run of this launch nests under), then works it
with N local processes; `join` (`runner.py worker`) lets a worker anywhere else in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from ablations.design import designs
from ablations.engine.defaults import DEFAULT_STORAGE, DEFAULT_TRACKING
from ablations.engine.progress import Progress, count_done, study_status, summarize
from ablations.engine.queue import close_orphans, plan_state, reconcile
from ablations.design.spec import StudySpec
from ablations.tracking.retry import StoreError
from ablations.engine.storage import finished_trial_ids, handles, open_storage, queue_lock, safe_url
from ablations.engine.study import check_joinable, check_tracking, load_study, open_study, plan_of
from ablations.engine.torch_setup import child_env
from ablations.engine.worker import WorkerContext, work, worker_process


@dataclass
class LaunchResult:
    total: int
    done: int
    gave_up: int
    interrupted: bool
    parent_run_id: str
    experiment_id: str
    summary: list[dict[str, Any]]


def launch(spec: StudySpec, storage_url: str = DEFAULT_STORAGE,
           tracking_uri: str = DEFAULT_TRACKING, workers: int = 1,
           out=sys.stdout, device: Optional[str] = None,
           threads: Optional[int] = None, ensemble: str = "auto") -> LaunchResult:
    """Create/resume the study, enqueue what is missing, run it with `workers` local processes."""
    from ablations.tracking.notes import launch_note
    from ablations.tracking.tracker import StudyTracker

    check_tracking(tracking_uri)
    storage, study = open_study(spec, storage_url, create=True)
    write_dashboard_note(study, spec)
    plan = plan_of(spec)
    tracker = StudyTracker(tracking_uri, spec.name)
    with queue_lock(storage, spec.name):
        state = reconcile(study, plan, tracker)
    close_orphans(study, tracker)

    desc = spec.description or f"Ablation study {spec.name}"
    if spec.design == "fractional_factorial":
        desc += "\n\nDesign: " + designs.describe_fraction(spec.design_factors, spec.fraction)
    exp_tags = {"study.design": spec.design, "study.source": spec.source,
                "study.recipe": spec.recipe.ref or spec.recipe.name,
                "optuna.storage": safe_url(storage_url)}
    if spec.stress_factors:  # the analysis reads which factors are the stress axis from here
        exp_tags["study.stress"] = ",".join(f.name for f in spec.stress_factors)
    experiment_id = tracker.ensure_experiment(desc, exp_tags)
    tracker.close_stale_launches()
    parent = tracker.start_launch(
        f"{spec.name} launch {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"study": spec.name, "design": spec.design, "optuna_storage": safe_url(storage_url)},
        params={"design": spec.design, "recipe": spec.recipe.name,
                "factors": ",".join(f.name for f in spec.factors),
                "fixes": ",".join(f.name for f in spec.factors if f.kind == "fix"),
                "seeds": json.dumps(list(spec.seeds)), "baseline": spec.baseline,
                "base": json.dumps(spec.base), "objective": f"{spec.objective_metric} "
                                                             f"({spec.direction})",
                "objective_metric": spec.objective_metric,
                "runs_total": plan.total, "workers": workers})
    _write_views(tracker, spec, plan)
    print(f"study {spec.name}: {spec.design}, {len(spec.design_factors)} factors"
          + (f" x stress {', '.join(f.name for f in spec.stress_factors)}"
             if spec.stress_factors else "") + ", "
          f"{plan.total} {plan.unit} "
          f"({len(state.done)} done, {len(state.running)} in flight elsewhere, "
          f"{len(state.queued) + len(state.enqueued)} queued, {len(state.gave_up)} given up); "
          f"{workers} worker(s)", file=out, flush=True)

    deadline = time.time() + spec.minutes * 60 if spec.minutes else None
    ctx = WorkerContext(spec, storage_url, tracking_uri, parent, deadline,
                        threads=threads or threads_per_worker(workers),
                        fit_threads=threads is None, device=device,
                        announce_wait=False, ensemble=ensemble)
    progress = Progress(plan.total, len(state.done), out)
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
    end = plan_state(study, plan)
    if not interrupted:  # the views again, now that the runs' outcomes are known
        _write_views(tracker, spec, plan)
    done, gave_up, total = len(end.done), len(end.gave_up), plan.total
    summary = summarize(study, plan)
    tracker.end_launch(parent, "KILLED" if interrupted else
                       "FINISHED" if done >= total or workers == 0 else "FAILED",
                       {"runs_done": float(done), "runs_total": float(total),
                        "runs_given_up": float(gave_up)},
                       note=launch_note(spec.name, done, total, gave_up, interrupted))
    return LaunchResult(total, done, gave_up, interrupted, parent, experiment_id, summary)


def dashboard_note(spec: StudySpec) -> Optional[str]:
    """The study note optuna-dashboard shows above its charts: for a design (not a search), a
    warning that its importance chart is not the study's analysis."""
    if spec.design == "search":
        return None
    return (f"**Not the analysis.** `{spec.name}` is a {spec.design.replace('_', ' ')} study: the "
            f"design fixed its cells and seeds, no sampler chose them. The Hyperparameter "
            f"Importance chart here is fANOVA on the objective over all runs; it ignores the "
            f"design, gives no interval and can rank factors that have no effect (it splits "
            f"importance between them). The effects with 95 % CIs and the verdicts are in the "
            f"report: `python runner.py report {spec.source}`, or report/report.html on the "
            f"study's launch run in MLflow.")


def write_dashboard_note(study, spec: StudySpec) -> None:
    """Put dashboard_note on the study where optuna-dashboard is installed (its own format);
    written once, rewritten only when the text changes."""
    import importlib.util

    note = dashboard_note(spec)
    if note is None or importlib.util.find_spec("optuna_dashboard") is None:
        return
    try:
        notes = _dashboard_notes()
        if notes.get_note(study) != note:
            notes.save_note(study, note)
    except Exception as e:  # noqa: BLE001 - a note is not worth failing a launch for
        print(f"warning: optuna-dashboard note not written ({e})", file=sys.stderr)


def _dashboard_notes():
    """optuna-dashboard's own note functions (optuna_dashboard/_note.py, which imports only
    optuna), loaded without the package: its __init__ imports the web app and, through its
    importance module, scikit-learn, 0.86 s of the main job's 31 s (benchmarks/main_job.py).
    Falls back to the package where the file is not there."""
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("optuna_dashboard")  # (finds it without running it)
    path = Path(next(iter(found.submodule_search_locations or []), "")) / "_note.py"
    spec = importlib.util.spec_from_file_location("_chorus_optuna_dashboard_note", path)
    if not path.is_file() or spec is None or spec.loader is None:
        import optuna_dashboard

        return optuna_dashboard
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_views(tracker, spec: StudySpec, plan) -> None:
    """The study's saved views (ablations/tracking/ui/views.py), which run descriptions link
    to; best effort: browsing works without them, and `runner.py ui` writes them too. Written
    before the runs (the links work from the first run on) and again after them: once every run
    is counted, the outcomes that are the same in all of them are not drawn (views.from_store)."""
    from ablations.tracking.ui import views
    from ablations.tracking.tracker import run_name

    try:
        layout = views.spec_layout(spec, [run_name(spec, r.cell, r.seed) for r in plan])
        runs = plan.total * (len(spec.seeds) if plan.search else 1)  # (a trial: every seed)
        layout = views.from_store(layout, tracker.client, tracker.experiment_id, runs)
        views.write_views(tracker.client, tracker.client.get_experiment(tracker.experiment_id),
                          layout)
    except Exception as e:  # noqa: BLE001
        print(f"warning: the study's saved views were not written ({e})", file=sys.stderr)


def join(spec: StudySpec, storage_url: str, tracking_uri: str, device: Optional[str] = None,
         threads: Optional[int] = None, wait: bool = True, ensemble: str = "auto",
         fit_threads: bool = True) -> WorkerContext:
    """A worker joining a launched study (any machine): every store is checked before training,
    and its runs are nested under the study's latest launch in the MLflow UI."""
    from ablations.tracking.tracker import StudyTracker

    check_joinable(spec, storage_url, tracking_uri)
    tracker = StudyTracker(tracking_uri, spec.name)
    if tracker.experiment_id is None:
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: no MLflow experiment {spec.name!r}; use "
                         f"the tracking URI the study was launched with")
    launch_run = tracker.latest_launch()
    return WorkerContext(spec, storage_url, tracking_uri,
                         parent_run_id=launch_run.info.run_id if launch_run else None,
                         threads=threads, fit_threads=fit_threads, device=device, wait=wait,
                         ensemble=ensemble)



def join_and_work(spec: StudySpec, storage_url: str, tracking_uri: str,
                  device: Optional[str] = None, threads: Optional[int] = None, wait: bool = True,
                  ensemble: str = "auto", fit_threads: bool = True) -> int:
    """`runner.py worker`: join the study, say where it stands, then work it until no run is left;
    the progress line counts the study's finished runs wherever they ran. Returns the runs
    executed here."""
    ctx = join(spec, storage_url, tracking_uri, device=device, threads=threads, wait=wait,
               ensemble=ensemble, fit_threads=fit_threads)
    st = study_status(spec, storage_url)
    print(f"worker on study {spec.name}: {st['done']}/{st['total']} done, {st['queued']} "
          f"queued, {st['running']} running elsewhere; "
          + (f"{ctx.threads} thread(s)" if not ctx.fit_threads
             else f"up to {ctx.threads} thread(s), fewer while other processes use the cores")
          + (f", device {ctx.device}" if ctx.device else ""), flush=True)
    study = load_study(spec, open_storage(storage_url))
    plan = plan_of(spec)
    progress = Progress(total=st["total"] or 0, already=st["done"],
                        done_fn=lambda: count_done(study, plan))
    return work(ctx, on_done=progress)

def worker_context(ctx: WorkerContext, i: int) -> WorkerContext:
    """Local worker i's context: with --device cuda:0,cuda:1 the workers take the devices in
    turn (worker i gets device i mod n)."""
    if not ctx.device or "," not in ctx.device:
        return ctx
    devices = ctx.device.split(",")
    return dataclasses.replace(ctx, device=devices[i % len(devices)])


def threads_per_worker(workers: int) -> int:
    """Workers on one machine split its cores (torch oversubscribed is 10x slower, measured)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


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
    procs = [mp.Process(target=worker_process, args=(worker_context(ctx, i),), daemon=False)
             for i in range(1, workers)]
    ctx = worker_context(ctx, 0)
    storage, study_id = handles(study)
    seen = set(finished_trial_ids(storage, study_id))
    lock, stop = threading.Lock(), threading.Event()
    with child_env():  # their OpenMP threads spin only briefly (ablations/engine/torch_setup.py)
        for p in procs:
            p.start()

    def poll() -> None:
        with lock:  # (not get_trials: it re-reads every queued trial, seconds for big designs)
            for trial_id in finished_trial_ids(storage, study_id):
                if trial_id not in seen:
                    seen.add(trial_id)
                    t = storage.get_trial(trial_id)
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
