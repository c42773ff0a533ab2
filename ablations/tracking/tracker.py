"""MLflow tracking: an experiment per study, a parent run per launch, a child run per run.

Per-step metrics are buffered in memory and written with `log_batch` (never `log_metric` per
step: 7.6 ms per value on SQLite vs ~0.05 ms batched, measured here), flushed every
`flush_every` values, at the end and on failure. Non-finite values are not written as metric
values (they break MLflow's charts); the full-resolution curves artifact (curves.csv) keeps every
value, NaN included. train() itself logs the step curves `nonfinite/events`,
`nonfinite/skipped_steps` and `nonfinite/spikes` (-> grad/spike_warnings) where they change; each gets
the table `nonfinite_events.csv` (one row per non-finite event: where, statistics, songs,
lead-up), `grad_spikes.csv` when the spike check warned (same columns: a spike is a warning about
a finite gradient, not a non-finite event), and the tags `status` and `first_nonfinite_where`
("module:stage") to filter runs by in the UI.

How a study reads in the MLflow UI (ablations/tracking/ui/views.py has the saved views):
  * run names are short and start with the seed (`s0 bias_init=on lr=0.001`), so paired runs
    differ at a glance even when the column is cut;
  * every single-value metric is logged at step 0: MLflow draws a metric whose last step is 0 as a
    bar chart (grouped by a fix: one bar per group), a later step as a one-dot line chart;
  * the headline metrics `final_val_f1` (a diverged run counts 0, as the analysis counts it) and
    `diverged` (0/1: its mean over a group is the divergence rate) are rounded to 3 significant
    digits for the runs table (MLflow shows 16 decimals); `outcome.*` keeps full precision and is
    what `ablations.results.analysis` reads (a dot, not a slash: a run page's curve sections then
    come first, see names.OUTCOME_PREFIX); the study's objective gets a headline metric of its own when
    it is another metric;
  * fixes are tags (filter, group by) and params (the compare page's parallel coordinates);
  * no empty tag is written; `result.json` is strict JSON (null where a value is NaN).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ablations.design import identity
from ablations.tracking.names import (KIND_TAG, REPORT_PATH, TRAINING_KIND, artifact_url,
                                      latest_launch, outcome_key)
from ablations.tracking.notes import fix_states, launch_note, report_note
from ablations.tracking.retry import describe_error, tracking_retry_budget_s, tracking_transient, with_retry
from model.config import TrainConfig
from model.recipe import recipe_for
from model.nonfinite import EVENT_COLUMNS, event_row
from model.train import TrainResult

if TYPE_CHECKING:  # only their attributes are used: no import of the study machinery at run time
    from ablations.design.designs import Cell
    from ablations.design.spec import StudySpec

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
NOTE_TAG = "mlflow.note.content"  # a run's or experiment's description (Markdown) in the UI
HEADLINE_F1 = "final_val_f1"
SPIKES_KEY = "grad/spike_warnings"  # train()'s nonfinite/spikes, on MLflow (see ChildRun.log)
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"  # who started a launch run
# Against a tracking server MLflow prints "View run ... at: URL" for every run it ends: hundreds
# of lines between our progress lines. `runner.py ui` prints the study's URL instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's client retries a request 7 times with doubling waits (~4 min, measured 250 s) before it
# fails; our own retry (CHORUS_TRACKING_RETRY_S) is what bounds an outage, so MLflow's is short.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
T = TypeVar("T")


def tracking_retry(fn: Callable[[], T], what: str, budget_s: Optional[float] = None) -> T:
    """Call fn, retrying transient tracking faults with backoff for CHORUS_TRACKING_RETRY_S
    (default 120 s) on top of MLflow's own per-request retries (cut to 2, above)."""
    return with_retry(fn, what, tracking_retry_budget_s() if budget_s is None else budget_s,
                      transient=tracking_transient, label="tracking")


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the code that ran (with '+dirty' when the tree has changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_name(spec: StudySpec, cell: Cell, seed: int) -> str:
    """Seed first, then the cell: `s0 bias_init=on lr=0.001`. MLflow cuts long names at the
    right, so the seed, which tells paired runs apart, must not come last."""
    return f"s{seed} {cell.label(spec.factors)}"


def _round(v: float) -> float:
    """3 significant digits: what the runs table shows (it prints a float's every digit)."""
    return float(f"{v:.3g}")


def headline_metrics(spec: Optional[StudySpec], res: TrainResult) -> dict[str, float]:
    """The few values a reader compares runs by, rounded, counted as the analysis counts them:
    final_val_f1 (0 for a diverged run), diverged (0/1) and the study's objective."""
    diverged = res.status == "diverged"
    out = {"diverged": float(diverged)}
    f1 = 0.0 if diverged else res.final_val_f1
    if math.isfinite(f1):
        out[HEADLINE_F1] = _round(f1)
    if spec is not None and spec.objective_metric != HEADLINE_F1:
        v = res.outcome()[spec.objective_metric]
        v = v if math.isfinite(v) else spec.diverged_value()
        if math.isfinite(v):
            out[spec.objective_metric] = _round(v)
    return out


def run_tags(spec: StudySpec, cell: Cell, seed: int, run_key: str, trial_number: int,
             worker: str, attempt: int) -> dict[str, str]:
    """A run's identity tags (ablations/design/identity.py: the analysis reads them back; `worker` and
    `attempt` say who ran which attempt)."""
    tags = {"study": spec.name, "design": spec.design, **identity.tags(spec, cell, seed, run_key),
            "optuna_trial": str(trial_number), "worker": worker, "attempt": str(attempt)}
    return _nonempty(tags)


def _nonempty(tags: dict[str, str]) -> dict[str, str]:
    """Tags without empty values: an empty tag is noise on the run page ("roles" outside
    one-at-a-time designs, "first_nonfinite_where" of a run that stayed finite)."""
    return {k: v for k, v in tags.items() if v != ""}


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (before any training) if the tracking store cannot be reached.

    A server is probed once on /health with a short timeout: MLflow's own client retries with
    backoff for minutes (250 s measured here) before giving up on a dead server.
    """
    if tracking_uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    MlflowClient(tracking_uri).search_experiments(max_results=1)


class StudyTracker:
    """The MLflow side of one study: its experiment, launches and runs."""

    def __init__(self, tracking_uri: str, experiment_name: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_name = experiment_name
        exp = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = exp.experiment_id if exp else None

    def ensure_experiment(self, description: str, tags: dict[str, str]) -> str:
        """Create the experiment once (by the launcher, before workers start)."""
        if self.experiment_id is None:
            # a model-training experiment: MLflow 3 otherwise treats it as a GenAI one
            self.experiment_id = self.client.create_experiment(
                self.experiment_name, tags={KIND_TAG: TRAINING_KIND})
        self.client.set_experiment_tag(self.experiment_id, NOTE_TAG, description)
        self.client.set_experiment_tag(self.experiment_id, "study.description", description)
        for k, v in tags.items():
            self.client.set_experiment_tag(self.experiment_id, k, v)
        return self.experiment_id

    def start_launch(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, "kind": "launch", "git_commit": git_commit(),
                                           "launched_by": PROCESS_ID})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000])
                                                       for k, v in params.items()])
        return run.info.run_id

    def end_launch(self, run_id: str, status: str, summary: Optional[dict[str, float]] = None,
                   note: str = "") -> None:
        if summary:
            ts = _now_ms()
            self.client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in summary.items()
                                                   if math.isfinite(v)])
        if note:
            self.client.set_tag(run_id, NOTE_TAG, note)
        self.client.set_terminated(run_id, status)

    def log_report(self, out_dir: str, verdicts: list[tuple[str, str]], table_md: str,
                   agreement: str, runs: int) -> Optional[str]:
        """Attach a report folder to the latest launch run and put its verdicts and a link to
        report.md in that run's description and the experiment's; returns the run id."""
        self.close_stale_launches()
        launch = self.latest_launch()
        if launch is None:
            return None
        rid = launch.info.run_id
        self.client.log_artifacts(rid, out_dir, "report")
        link = artifact_url(self.experiment_id, rid, REPORT_PATH)
        m = launch.data.metrics
        summary = (launch_note(self.experiment_name, int(m["runs_done"]), int(m["runs_total"]),
                               int(m.get("runs_given_up", 0)), launch.info.status == "KILLED")
                   .split(" The verdicts")[0] if "runs_done" in m and "runs_total" in m else "")
        self.client.set_tag(rid, "report", REPORT_PATH)
        self.client.set_tag(rid, NOTE_TAG, report_note(verdicts, table_md, agreement, runs, link,
                                                       summary))
        self._repoint_report_links(rid)
        exp = self.client.get_experiment(self.experiment_id)
        base = (exp.tags or {}).get("study.description") or (exp.tags or {}).get(NOTE_TAG, "")
        # first, on the one line the runs page shows before its "expand" chevron
        self.client.set_experiment_tag(self.experiment_id, NOTE_TAG, (
            f"[**Report**]({link})" + (f" · {base}" if base else "")))
        return rid

    def _repoint_report_links(self, launch_id: str) -> int:
        """Runs of earlier launches (a resumed study) link to their own launch's report, which
        does not exist: point them at this one. Runs of this launch need no write."""
        moved, token = 0, None
        while True:
            page = self.client.search_runs([self.experiment_id], "tags.kind = 'run'",
                                           max_results=1000, page_token=token)
            for r in page:
                note, parent = r.data.tags.get(NOTE_TAG, ""), r.data.tags.get("mlflow.parentRunId")
                old = f"/runs/{parent}/artifacts/{REPORT_PATH}"
                if parent and parent != launch_id and old in note:
                    new = note.replace(old, f"/runs/{launch_id}/artifacts/{REPORT_PATH}")
                    self.client.set_tag(r.info.run_id, NOTE_TAG, new)
                    moved += 1
            token = page.token
            if not token:
                return moved

    def latest_launch(self, with_report: bool = False):
        """The study's most recent launch run, or the most recent one with a report."""
        if self.experiment_id is None:
            return None
        return latest_launch(self.client, self.experiment_id, with_report)

    def close_stale_launches(self) -> int:
        """Mark KILLED the launch runs left RUNNING by a launcher that is gone (killed, or its
        machine lost): otherwise they stay RUNNING in the UI forever. A launch counts as gone when
        its process (`launched_by` host:pid) is not running on this host; launches from other
        hosts are left alone (their process cannot be checked from here). Best effort."""
        if self.experiment_id is None:
            return 0
        try:
            runs = self.client.search_runs([self.experiment_id], "tags.kind = 'launch' and "
                                           "attributes.status = 'RUNNING'", max_results=1000)
        except Exception:  # noqa: BLE001 - cosmetic: nothing reads a launch's status
            return 0
        closed = 0
        for r in runs:
            if not _launcher_gone(r.data.tags.get("launched_by", ""), r.info.start_time):
                continue
            try:
                self.client.set_tag(r.info.run_id, "lost", "its launcher stopped without ending it")
                self.client.set_terminated(r.info.run_id, "KILLED")
                closed += 1
            except Exception:  # noqa: BLE001
                pass
        return closed

    def finish_run(self, run_id: str) -> None:
        """Mark a run FINISHED: from now on the analysis counts it."""
        tracking_retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "finish run")

    def running_runs_of_trial(self, trial_number: int) -> list[str]:
        """Ids of the RUNNING MLflow runs made for an Optuna trial of this study."""
        if self.experiment_id is None:
            return []
        try:
            runs = self.client.search_runs(
                [self.experiment_id], f"tags.optuna_trial = '{trial_number}' and "
                                      f"attributes.status = 'RUNNING'", max_results=100)
        except Exception as e:  # noqa: BLE001 - then the runs stay RUNNING, ignored by analysis
            print(f"tracking: could not look up the runs of trial {trial_number} "
                  f"({describe_error(e, 160)})", file=sys.stderr, flush=True)
            return []
        return [r.info.run_id for r in runs]

    def running_runs(self) -> list[tuple[str, Optional[int]]]:
        """(run id, Optuna trial number) of this study's RUNNING runs (not launches)."""
        if self.experiment_id is None:
            return []
        runs = self.client.search_runs([self.experiment_id], "tags.kind = 'run' and "
                                       "attributes.status = 'RUNNING'", max_results=10000)
        return [(r.info.run_id, int(r.data.tags["optuna_trial"])
                 if r.data.tags.get("optuna_trial", "").isdigit() else None) for r in runs]

    def mark_lost(self, run_id: str, why: str, force: bool = False) -> None:
        """Mark the MLflow run of a lost attempt KILLED (the analysis ignores it); best effort.

        Only a RUNNING run is touched unless `force`: a lost worker's run may have finished.
        """
        try:
            if force or self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "lost", why)
                self.client.set_terminated(run_id, "KILLED")
        except Exception as e:  # noqa: BLE001 - the analysis ignores a RUNNING run too
            print(f"tracking: could not mark run {run_id} killed ({describe_error(e, 160)})",
                  file=sys.stderr, flush=True)

    def start_child(self, parent_run_id: Optional[str], run_name: str, cfg: TrainConfig,
                    tags: dict[str, str]) -> "ChildRun":
        all_tags = {**tags, "kind": "run", "git_commit": git_commit(), "recipe": recipe_for(cfg).name,
                    **{f"fix.{k}": v for k, v in fix_states(cfg).items()}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = tracking_retry(lambda: self.client.create_run(self.experiment_id, run_name=run_name,
                                                            tags=all_tags), "create run")
        child = ChildRun(self.client, run.info.run_id, experiment_id=self.experiment_id)
        # fixes as params too: the compare page's parallel coordinates only offer params
        params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                  for k, v in cfg.to_dict().items()]
        params += [Param(f"fix.{k}", v) for k, v in fix_states(cfg).items()]
        tracking_retry(lambda: self.client.log_batch(child.run_id, params=params), "log params")
        return child


def attach_report(tracking_uri: Optional[str], study: str, out_dir: str,
                  verdicts: list[tuple[str, str]], table_md: str, agreement: str,
                  runs: int) -> Optional[str]:
    """Attach a report folder to the study's latest launch run (StudyTracker.log_report); None
    when the study has no experiment or no launch run. `tracking_uri` None: MLflow's default."""
    tracker = StudyTracker(tracking_uri, study)
    if tracker.experiment_id is None:
        return None
    return tracker.log_report(out_dir, verdicts, table_md, agreement, runs)


class ChildRun:
    """One run's MLflow run: buffered step metrics, outcome, artifacts. `log` is train()'s logger."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = MAX_BATCH,
                 experiment_id: str = ""):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self.experiment_id = experiment_id
        self.buffer: list[Metric] = []
        self.rows: list[tuple[int, str, float]] = []  # full-resolution curves, NaN included
        self.held: list[Metric] = []  # train/lr while it has not changed (see `log`)
        self.lr_varies = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one call of train()'s `log`; the nonfinite/* counts arrive from train() too.

        Two keys are changed on the way to MLflow (curves.csv keeps train()'s): `train/lr` is
        held back until it changes within the run (warmup, a schedule, a rollback's cut), since a
        constant lr draws as a flat line on a meaningless axis; and `nonfinite/spikes` (warnings
        about large but finite gradients) becomes `grad/spike_warnings`, out of the nonfinite
        section of a run that never went non-finite."""
        ts = _now_ms()
        for k, v in metrics.items():
            self.rows.append((step, k, v))
            if not math.isfinite(v):
                continue
            k = SPIKES_KEY if k == "nonfinite/spikes" else k
            if k == "train/lr" and not self.lr_varies:
                if self.held and v != self.held[0].value:
                    self.lr_varies = True
                    self.buffer += self.held
                    self.held = []
                else:
                    self.held.append(Metric(k, v, ts, step))
                    continue
            self.buffer.append(Metric(k, v, ts, step))
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self, budget_s: Optional[float] = None) -> None:
        """Write the buffer; a chunk leaves it only once written, so a failed flush loses nothing
        and the next one (or finish/fail) retries it. Re-sending a chunk whose write did commit
        is harmless: MLflow skips metric rows it already has."""
        while self.buffer:
            chunk = self.buffer[:MAX_BATCH]
            tracking_retry(lambda: self.client.log_batch(self.run_id, metrics=chunk),
                           "log metrics", budget_s)
            del self.buffer[:len(chunk)]

    def finish(self, result: TrainResult, extra_tags: dict[str, str],
               spec: Optional[StudySpec] = None) -> None:
        """Everything but the terminal status: outcome and headline metrics, tags, artifacts.

        Single values are logged at step 0 (MLflow draws them as bars; see the module docstring).
        """
        self.flush()
        ts = _now_ms()
        outcome = [Metric(outcome_key(k), v, ts, 0) for k, v in result.outcome().items()
                   if math.isfinite(v)]
        outcome += [Metric(k, v, ts, 0) for k, v in headline_metrics(spec, result).items()]
        first = result.first_nonfinite_step
        tags = _nonempty({"status": result.status,
                          "first_nonfinite_step": "" if first is None else str(first),
                          "first_nonfinite_where": result.first_nonfinite_where, **extra_tags})
        tracking_retry(lambda: self.client.log_batch(
            self.run_id, metrics=outcome, tags=[RunTag(k, v) for k, v in tags.items()]),
            "log outcome")
        curves = self._curves_csv()
        events = _events_csv([e for e in result.events if e.kind != "grad_spike"])
        spikes = [e for e in result.events if e.kind == "grad_spike"]
        summary = _strict_json({"status": result.status, **result.outcome(),
                                "events": [asdict(e) for e in result.events]})
        tracking_retry(lambda: self.client.log_text(self.run_id, curves, "curves.csv"),
                       "log curves.csv")
        tracking_retry(lambda: self.client.log_text(self.run_id, events, "nonfinite_events.csv"),
                       "log nonfinite_events.csv")
        if spikes:
            tracking_retry(lambda: self.client.log_text(self.run_id, _events_csv(spikes),
                                                        "grad_spikes.csv"), "log grad_spikes.csv")
        tracking_retry(lambda: self.client.log_text(
            self.run_id, json.dumps(summary, indent=2, allow_nan=False), "result.json"),
            "log result.json")

    def fail(self, error: str, status: str = "FAILED") -> None:
        """Keep what was logged, attach the error, mark the run failed/killed."""
        try:
            self.flush(budget_s=0)  # the run has failed already: one try, no waiting
            self.client.set_tag(self.run_id, "status", "crashed" if status == "FAILED" else "interrupted")
            self.client.log_text(self.run_id, error, "error.txt")
        finally:
            self.client.set_terminated(self.run_id, status)

    def terminate(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def _curves_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "metric", "value"])
        w.writerows(self.rows)
        return buf.getvalue()


def _events_csv(events: list) -> str:
    """One row per event; the first six columns are the original table's, the rest come from
    model.nonfinite.event_row (forensics flattened, lead-up)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EVENT_COLUMNS)
    w.writeheader()
    w.writerows(event_row(e) for e in events)
    return buf.getvalue()


def _strict_json(v: Any) -> Any:
    """NaN and infinities as null: strict JSON parsers (browsers, jq, Go) reject bare NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict_json(x) for x in v]
    return v


def _launcher_gone(launched_by: str, start_ms: int) -> bool:
    """True if `host:pid` names a process of this host that is no longer the one that started
    at start_ms (exited, or its pid reused by a later process). Unknown or other host: False."""
    host, _, pid = launched_by.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    started = _process_start_s(int(pid))
    return started is None or started > start_ms / 1000 + 5


def _process_start_s(pid: int) -> Optional[float]:
    """When process pid started (epoch seconds), None if there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:  # Linux: field 22 of /proc/PID/stat is the start time in clock ticks since boot
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines()
                     if l.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return 0.0  # alive, start unknown: treat as the launcher


def _now_ms() -> int:
    return int(time.time() * 1000)
