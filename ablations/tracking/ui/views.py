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
    (rounded), the factors, the seed, the non-finite counts (`outcome.*`; `outcome/*` too where
    the study's runs carry those older names, so a resumed study shows every run's count); a
    Run Name column as wide as the longest name needs. KILLED / FAILED attempts and the launch
    runs are a filter away: the view "All attempts" (or clearing the filter).
  * "F1 by <factor>", one per factor (at most MAX_FACTOR_VIEWS): the counted runs grouped by that
    factor; its chart view opens on bar charts of the mean final F1 (a diverged run counts 0, as
    in the report) and of the divergence rate per group, then the training curves per group.
    A chart sees every run of the view (runsHiddenMode SHOW_ALL; MLflow's default charts only
    the first 10 or 20).
  * Once every run of the study is counted, an outcome that is the same in every counted run
    (`diverged` when nothing diverged, `outcome.scaler_skips` at 0, ...) is not drawn: its bars
    would be invisible (all 0) or equal. MLflow has no server-side setting for which charts a
    runs page draws (no chart API, no "hide constant metrics" option; `hideEmptyCharts` hides
    only charts with no data at all), and it adds a card for every logged metric it finds no card
    for, so such a metric gets a card marked deleted, as the UI's own "Delete chart" leaves it.
    A one-line section, collapsed, says what is not drawn ("not drawn, the same in all 18 runs:
    diverged 0; 12 outcome.*: epochs 2, ..."); a user can add any of them back ("Add chart").

A view is written when absent, and rewritten when it is one of ours that nobody has edited since
(its createdAt == updatedAt) and is from an older version or differs (the study has finished
since, or a resumed older study carries both outcome prefixes); a view a user saved is left alone.
The views are written at launch, again when its runs are done, and by `runner.py ui`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

# (the tracker writes these too; they live in the tracking layer, which never imports the UI)
from ablations.tracking.names import (ALL_KEY, COUNTED, KIND_TAG, LAYOUT_QUERY,  # noqa: F401
                                      OLD_OUTCOME_PREFIX, OUTCOME_PREFIX, OUTCOME_PREFIXES,
                                      REPORT_PATH, RUNS_KEY,
                                      TRAINING_KIND, artifact_url, latest_launch, md_escape,
                                      outcome_key, outcomes, siblings_url, study_runs_url)

# bump when the states below change: unedited older views are rewritten (so is an unedited view
# of this version whose state differs, e.g. once the study's constant outcomes are known)
VIEW_VERSION = 3
PREFIX = "mlflow.sharedViewState."
MAX_FACTOR_VIEWS = 8
NAME_COL, DATE_COL = "attributes.`Run Name`", "runDateAndNestInfo"
F1, DIVERGED = "final_val_f1", "diverged"  # headline metrics (ablations.tracking.tracker)
MODEL_METRICS = "Model metrics"  # MLflow's section of the keys with no "/": outcome.* land here
OLD_SECTION = OLD_OUTCOME_PREFIX.rstrip("/")  # the section of the older outcome/* keys


@dataclass(frozen=True)
class StudyLayout:
    """What the views need to know about a study (read off its launch and child runs)."""

    factors: list[tuple[str, bool]]  # (name, is a fix) in the study file's order
    objective: Optional[str]  # the objective metric, e.g. final_val_f1
    longest_name: int = 40  # characters in the longest child run name
    # the outcome prefixes the study's runs carry, the current one first (an older store, or a
    # resumed study, has outcome/ too: names.OUTCOME_PREFIXES)
    prefixes: tuple[str, ...] = (OUTCOME_PREFIX,)
    runs: int = 0  # counted runs `constant` was read from (0: not read, or the study unfinished)
    # metric -> its value, where the same in every counted run (headline metrics, and outcomes
    # under the current prefix: outcome_key); only known once every run is counted
    constant: dict[str, float] = field(default_factory=dict)


def spec_layout(spec, run_names: list[str]) -> StudyLayout:
    """The layout of a study about to run, from its study file and its runs' names: the launch
    writes the views, so that the "Study runs" link in every run's description works before
    anyone starts `runner.py ui` (on a team server nobody may)."""
    return StudyLayout([(f.name, f.kind == "fix") for f in spec.factors], spec.objective_metric,
                       max(map(len, run_names), default=40))


def from_store(layout: StudyLayout, client, experiment_id: str,
               runs_total: Optional[int]) -> StudyLayout:
    """`layout` with what the study's counted runs say: the outcome prefixes they carry and, once
    `runs_total` runs are counted (the study finished), the outcomes that are the same in all."""
    seen: set[str] = set()
    values: dict[str, set[Optional[float]]] = {}
    n, token = 0, None
    while True:
        page = client.search_runs([experiment_id], COUNTED, max_results=1000, page_token=token)
        for r in page:
            m = r.data.metrics
            seen.update(p for p in OUTCOME_PREFIXES if any(k.startswith(p) for k in m))
            mine = {k: m[k] for k in (F1, DIVERGED, layout.objective) if k and k in m}
            mine.update({outcome_key(k): v for k, v in outcomes(m).items()})
            for k in values.keys() | mine.keys():  # None: a run without it (so not constant)
                values.setdefault(k, {None} if n else set()).add(mine.get(k))
            n += 1
        token = page.token
        if not token:
            break
    # the current prefix first, always: a resumed old study writes it from its next run on
    prefixes = (OUTCOME_PREFIX, *(p for p in OUTCOME_PREFIXES
                                  if p in seen and p != OUTCOME_PREFIX))
    finished = runs_total is not None and n >= max(runs_total, 2)  # 1 run: all "constant"
    constant = {k: next(iter(v)) for k, v in sorted(values.items())
                if finished and len(v) == 1 and None not in v}
    return dataclasses.replace(layout, prefixes=prefixes, runs=n if finished else 0,
                               constant=constant)


def not_drawn(layout: StudyLayout) -> str:
    """The one line saying which outcomes are not drawn, and why; "" when all are. The headline
    metrics and the count come first: MLflow cuts a section's name to the panel's width."""
    if not layout.constant:
        return ""
    head = [f"{k} {v:g}" for k, v in layout.constant.items() if not k.startswith(OUTCOME_PREFIX)]
    rest = [f"{k[len(OUTCOME_PREFIX):]} {v:g}" for k, v in layout.constant.items()
            if k.startswith(OUTCOME_PREFIX)]
    parts = ([", ".join(head)] if head else []) + (
        [f"{len(rest)} {OUTCOME_PREFIX}*: " + ", ".join(rest)] if rest else [])
    return f"not drawn, the same in all {layout.runs} runs: " + "; ".join(parts)


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
    nonfinite = [f"metrics.`{p}{name}`" for p in layout.prefixes
                 for name in ("nonfinite_events", "first_nonfinite_step")]
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
        state.update(_charts(name, layout))
    return state


def _charts(factor: str, layout: StudyLayout) -> dict:
    """Chart cards: the headline bars in a first section, then the curves; the non-finite and
    outcome sections start collapsed (outcome.* land in MLflow's "Model metrics"; outcome/* of
    older runs in "outcome"). MLflow adds a card for every other metric into the section named
    after its prefix, keeping this order (isAccordionReordered). A constant outcome gets a card
    marked deleted (not drawn) and the line `not_drawn` as a collapsed section of its own."""
    objective, hidden = layout.objective, layout.constant
    bars = [(F1, "final F1", "final F1, mean per group (diverged = 0)"),
            (DIVERGED, "divergence rate", "divergence rate (share of runs diverged)")]
    if objective and objective != F1:
        bars.append((objective, objective, f"{objective} (objective), mean per group"))
    drawn = [short for key, short, _ in bars if key not in hidden]
    what = (", ".join(drawn[:-1]) + " and " + drawn[-1] if len(drawn) > 1 else
            drawn[0] if drawn else "no headline bar")
    note = not_drawn(layout)
    sections = [("Study: " + f"{what} by {factor}", True), *([(note, False)] if note else []),
                ("train", True), ("val", True), ("nonfinite", False),
                *([(OLD_SECTION, False)] if OLD_OUTCOME_PREFIX in layout.prefixes else []),
                (MODEL_METRICS, False)]
    ids = {name: f"chorus-section-{i}" for i, (name, _) in enumerate(sections)}
    first = ids[sections[0][0]]

    def card(i: int, key: str, title: str, section: str, deleted: bool) -> dict:
        return {"uuid": f"chorus-chart-{i}", "type": "BAR", "metricKey": key,
                "displayName": title, "metricSectionId": section, "runsCountToCompare": 100,
                "deleted": deleted, "isGenerated": True}

    cards = [card(i, key, title, first, key in hidden) for i, (key, _, title) in enumerate(bars)]
    for key in hidden:  # the constant outcomes, under each prefix the runs carry
        if not key.startswith(OUTCOME_PREFIX):
            continue  # a headline metric: its card is above
        name = key[len(OUTCOME_PREFIX):]
        for p in layout.prefixes:
            section = ids[MODEL_METRICS] if p == OUTCOME_PREFIX else ids[OLD_SECTION]
            cards.append(card(len(cards), p + name, p + name, section, True))
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


def _needs_writing(current: Optional[str], state: dict) -> bool:
    """Absent, or ours and unedited (createdAt == updatedAt: the UI's Save moves updatedAt)
    and from an older version or with another state than `state`."""
    if current is None:
        return True
    try:
        view = json.loads(current)
        version = view.get("chorusVersion", 1)
        if view.get("updatedAt") != view.get("createdAt") or version > VIEW_VERSION:
            return False  # edited by a user, or written by a newer version
        return version < VIEW_VERSION or inflate(view["state"]) != state
    except (ValueError, TypeError, KeyError, AttributeError, zlib.error):
        return False  # not ours to judge


def write_views(client, experiment, layout: StudyLayout) -> list[str]:
    """Write the study's views where needed (see the module docstring); returns their keys."""
    tags = experiment.tags or {}
    now = int(time.time() * 1000)
    keys = []
    for key, (name, state) in views(layout).items():
        if _needs_writing(tags.get(PREFIX + key), state):
            client.set_experiment_tag(experiment.experiment_id, PREFIX + key, json.dumps(
                {"name": name, "createdAt": now, "updatedAt": now, "chorusVersion": VIEW_VERSION,
                 "state": deflate(state)}))
        keys.append(key)
    return keys
