"""Reading a study's progress from the store: `status`, the summary per cell, ETAs, and the
progress line printed as runs finish. Nothing here changes a run (`study_status` only fails the
trials of lost workers first, so that they show as what they are)."""

from __future__ import annotations

import contextlib
import datetime
import math
import statistics
import sys
import time
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from ablations.engine.queue import plan_state
from ablations.design.spec import StudySpec
from ablations.engine.storage import stale_trials
from ablations.engine.study import Plan, open_study, plan_of


class Progress:
    """One line per finished run, with done/total, diverged so far and an ETA.

    `done_fn` (a worker among others): read the study-wide done count from the store, so the
    count and the ETA cover every worker's runs, not just this one's.
    """

    def __init__(self, total: int, already: int, out=sys.stdout,
                 done_fn: Optional[Callable[[], int]] = None):
        self.total, self.done, self.out = total, already, out
        self.done_fn, self.start = done_fn, already
        self.diverged = self.crashed = 0
        self.t0 = time.time()

    def __call__(self, attrs: dict[str, Any]) -> None:
        status = attrs.get("status", "?")
        if status == "crashed":
            self.crashed += 1
        else:
            self.done += 1
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


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def count_done(study: optuna.Study, plan: Plan) -> int:
    """Runs of the plan with a COMPLETE trial (search: COMPLETE trials)."""
    return len(plan_state(study, plan).done)


def summarize(study: optuna.Study, plan: Plan) -> list[dict[str, Any]]:
    """Per cell: runs, status counts, objective mean and sd (current plan's runs only)."""
    cells: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not plan.counts(t):
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
    reverse = plan.spec.direction == "maximize"
    return sorted(out, key=lambda c: (-c["mean"] if reverse else c["mean"]) if math.isfinite(c["mean"])
                  else math.inf)


def study_status(spec: StudySpec, storage_url: str) -> dict[str, Any]:
    """Done / running / failed / queued counts, diverged count and an ETA, from the store."""
    _, study = open_study(spec, storage_url, create=False)
    stale_trials(study)
    plan = plan_of(spec)
    state = plan_state(study, plan)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and plan.counts(t)]
    diverged = sum(t.user_attrs.get("status") == "diverged" or
                   int(t.user_attrs.get("diverged_runs", 0) or 0) > 0 for t in complete)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete
                 if t.datetime_complete and t.datetime_start]
    left = max(0, plan.total - len(state.done) - len(state.gave_up))
    parallel = max(1, len(state.running))
    # no finished run to time yet: no estimate (None), rather than a misleading 0
    eta = (statistics.fmean(durations) * left / parallel if durations else None) if left else 0.0
    now = datetime.datetime.now()  # Optuna stamps trials with the worker's local time
    in_flight = [{"cell": t.user_attrs.get("cell", "?"), "seed": t.user_attrs.get("seed", "?"),
                  "worker": t.user_attrs.get("worker", "?"),
                  "running_s": (now - t.datetime_start).total_seconds() if t.datetime_start else None}
                 for t in trials if t.state == TrialState.RUNNING]
    return {"study": spec.name, "total": plan.total, "done": len(state.done),
            "running": len(state.running), "queued": len(state.queued),
            "failed_attempts": sum(t.state == TrialState.FAIL for t in trials),
            "given_up": len(state.gave_up), "diverged": diverged, "eta_s": eta,
            "in_flight": in_flight}
