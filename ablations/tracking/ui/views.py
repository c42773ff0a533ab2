"""The saved views `runner.py ui` puts on a study's MLflow experiment, in the UI's own format.

A saved view is an experiment tag `mlflow.sharedViewState.<key>` holding what the UI's "Views >
Save as new view" writes: {"name", "createdAt", "updatedAt", "state"} with the state deflated
(`deflate;` + base64 of zlib-compressed JSON). The state is the runs page's search facets
(filter, order) plus its UI state (columns, widths, grouping, chart cards). Opening
`#/experiments/ID/runs?viewStateShareKey=<key>` applies it; `compareRunsMode=CHART` in the same
URL opens the chart view instead of the table. Read off MLflow 3.17's UI bundle and checked in a
browser (tests/tracking/ui/test_ui_browser.py):

  * "Study runs": the counted runs only (FINISHED child runs: what the analysis counts), one row
    each, sorted by cell so the seeds of a cell sit together; columns status, the objective
    (rounded), the factors, the seed, the non-finite counts; a Run Name column as wide as the
    longest name needs. KILLED / FAILED attempts and the launch runs are a filter away: the view
    "All attempts" (or clearing the filter).
  * "F1 by <factor>", one per factor (at most MAX_FACTOR_VIEWS): the counted runs grouped by that
    factor; its chart view opens on bar charts of the mean final F1 (a diverged run counts 0, as
    in the report) and of the divergence rate per group, then the training curves per group.
    A chart sees every run of the view (runsHiddenMode SHOW_ALL; MLflow's default charts only
    the first 10 or 20).

A view is written when absent, and rewritten when it is one of ours from an older version that
nobody has edited since (its createdAt == updatedAt); a view a user saved is left alone.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from dataclasses import dataclass
from typing import Optional

# (the tracker writes these too; they live in the tracking layer, which never imports the UI)
from ablations.tracking.names import (ALL_KEY, COUNTED, KIND_TAG, LAYOUT_QUERY,  # noqa: F401
                                      REPORT_PATH, RUNS_KEY, TRAINING_KIND, artifact_url,
                                      latest_launch, md_escape, siblings_url, study_runs_url)

VIEW_VERSION = 2  # bump when the states below change: unedited older views are rewritten
PREFIX = "mlflow.sharedViewState."
MAX_FACTOR_VIEWS = 8
NAME_COL, DATE_COL = "attributes.`Run Name`", "runDateAndNestInfo"
F1, DIVERGED = "final_val_f1", "diverged"  # headline metrics (ablations.tracking.tracker)


@dataclass(frozen=True)
class StudyLayout:
    """What the views need to know about a study (read off its launch and child runs)."""

    factors: list[tuple[str, bool]]  # (name, is a fix) in the study file's order
    objective: Optional[str]  # the objective metric, e.g. final_val_f1
    longest_name: int = 40  # characters in the longest child run name


def spec_layout(spec, run_names: list[str]) -> StudyLayout:
    """The layout of a study about to run, from its study file and its runs' names: the launch
    writes the views, so that the "Study runs" link in every run's description works before
    anyone starts `runner.py ui` (on a team server nobody may)."""
    return StudyLayout([(f.name, f.kind == "fix") for f in spec.factors], spec.objective_metric,
                       max(map(len, run_names), default=40))


def factor_column(name: str, is_fix: bool) -> str:
    return f"tags.`fix.{name}`" if is_fix else f"params.`{name}`"


def factor_key(name: str) -> str:
    return f"chorus-by-{name}"


def deflate(state: dict) -> str:
    """The UI's compressed view state: 'deflate;' + base64 of zlib-deflated JSON."""
    raw = json.dumps(state, separators=(",", ":")).encode()
    return "deflate;" + base64.b64encode(zlib.compress(raw)).decode()


def inflate(value: str) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(value[len("deflate;"):])))


def name_width(chars: int) -> int:
    """Pixels for a Run Name column that shows `chars` characters of the UI's 13 px font (7 px
    a character measured, plus the run's colour dot and padding), within reason."""
    return max(220, min(620, 7 * chars + 60))


def _columns(layout: StudyLayout) -> tuple[list[str], dict[str, int]]:
    """Status and objective first (what a reader scans for), then the factors and the seed,
    then the non-finite counts; the widths of each."""
    objective = [f"metrics.`{layout.objective or F1}`"]
    factors = [factor_column(n, fix) for n, fix in layout.factors]
    nonfinite = ["metrics.`outcome/nonfinite_events`", "metrics.`outcome/first_nonfinite_step`"]
    cols = ["tags.`status`", *objective, *factors, "tags.`seed`", *nonfinite]
    widths = {NAME_COL: name_width(layout.longest_name), DATE_COL: 130, "duration": 80,
              "tags.`status`": 100, objective[0]: 120, "tags.`seed`": 70,
              **{c: max(110, 8 * len(c) - 40) for c in factors}, **{c: 150 for c in nonfinite}}
    return cols, widths


def _state(layout: StudyLayout, search: str, group: Optional[tuple[str, bool]] = None) -> dict:
    cols, widths = _columns(layout)
    state = {"searchFilter": search, "orderByKey": "tags.`cell`", "orderByAsc": True,
             "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
             "modelVersionFilter": "All Runs", "selectedColumns": cols,
             "columnOrder": [NAME_COL, *cols, DATE_COL, "duration"], "columnWidths": widths,
             "runsHiddenMode": "SHOW_ALL", "viewMaximized": False, "runListHidden": False,
             "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
             "groupsExpanded": {}, "isAccordionReordered": False,
             "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                       "selectedXAxisMetricKey": ""}}
    if group is not None:
        name, is_fix = group
        state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [
            {"mode": "tag" if is_fix else "param",
             "groupByData": f"fix.{name}" if is_fix else name}]}
        state.update(_charts(name, layout.objective))
    return state


def _charts(factor: str, objective: Optional[str]) -> dict:
    """Chart cards: the headline bars in a first section, then the curves; the raw outcome and
    non-finite sections start collapsed. MLflow adds a card for every other metric into the
    section named after its prefix, keeping this order (isAccordionReordered)."""
    sections = [("Study: " + f"final F1 and divergence rate by {factor}", True),
                ("train", True), ("val", True), ("nonfinite", False), ("outcome", False)]
    ids = {name: f"chorus-section-{i}" for i, (name, _) in enumerate(sections)}
    first = ids[sections[0][0]]
    bars = [(F1, "final F1, mean per group (diverged = 0)"),
            (DIVERGED, "divergence rate (share of runs diverged)")]
    if objective and objective != F1:
        bars.append((objective, f"{objective} (objective), mean per group"))
    cards = [{"uuid": f"chorus-chart-{i}", "type": "BAR", "metricKey": key, "displayName": title,
              "metricSectionId": first, "runsCountToCompare": 100, "deleted": False,
              "isGenerated": True} for i, (key, title) in enumerate(bars)]
    return {"compareRunCharts": cards, "isAccordionReordered": True,
            "compareRunSections": [{"uuid": ids[name], "name": name, "display": shown,
                                    "isReordered": False, "deleted": False, "isGenerated": True}
                                   for name, shown in sections]}


def views(layout: StudyLayout) -> dict[str, tuple[str, dict]]:
    """key -> (view name, state) of every view of a study, the default one first."""
    out = {RUNS_KEY: ("Study runs", _state(layout, COUNTED)),
           ALL_KEY: ("All attempts", _state(layout, ""))}
    for name, is_fix in layout.factors[:MAX_FACTOR_VIEWS]:
        out[factor_key(name)] = (f"F1 by {name}", _state(layout, COUNTED, (name, is_fix)))
    return out


def _needs_writing(current: Optional[str]) -> bool:
    if current is None:
        return True
    try:
        view = json.loads(current)
    except ValueError:
        return False  # not ours to judge
    edited = view.get("updatedAt") != view.get("createdAt")
    return not edited and view.get("chorusVersion", 1) < VIEW_VERSION


def write_views(client, experiment, layout: StudyLayout) -> list[str]:
    """Write the study's views where needed (see the module docstring); returns their keys."""
    tags = experiment.tags or {}
    now = int(time.time() * 1000)
    keys = []
    for key, (name, state) in views(layout).items():
        if _needs_writing(tags.get(PREFIX + key)):
            client.set_experiment_tag(experiment.experiment_id, PREFIX + key, json.dumps(
                {"name": name, "createdAt": now, "updatedAt": now, "chorusVersion": VIEW_VERSION,
                 "state": deflate(state)}))
        keys.append(key)
    return keys
