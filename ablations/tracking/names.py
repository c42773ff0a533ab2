"""Names on the MLflow store that the tracker writes and the UI reads: the experiment kind, where
the report lands, the outcome metrics' prefix, the UI's routes (an artifact, the study's runs
view, a cell's seeds), the latest launch run, Markdown escaping for descriptions. Imports nothing
of the project, so the UI (ablations.tracking.ui) and the tracker share them without the tracker
importing the UI."""

from __future__ import annotations

import re
import urllib.parse
from typing import Mapping, Optional

KIND_TAG = "mlflow.experimentKind"  # MLflow 3: "custom_model_development" = model training
TRAINING_KIND = "custom_model_development"
# Where the report lands among the launch run's artifacts: the HTML page, figures embedded,
# which MLflow previews (its Markdown view shows `![x](x.png)` as text); report.md sits beside it.
REPORT_PATH = "report/report.html"
LAYOUT_QUERY = "workflowType=machine_learning"
RUNS_KEY, ALL_KEY = "chorus-study-runs", "chorus-all-attempts"  # the saved views' share keys
COUNTED = "tags.kind = 'run' and attributes.status = 'FINISHED'"  # what the analysis counts
# A run's exact single-value outcomes are logged as `outcome.<name>`. A dot, not a slash: MLflow
# 3.17's run page makes a chart section of the prefix before a key's last "/", sorts the named
# sections alphabetically and puts the unprefixed "Model metrics" last, so `outcome/<name>` put
# ~25 bars before the `train/` and `val/` curves; `outcome.<name>` lands in "Model metrics",
# after every curve. Stores written before hold `outcome/<name>` (a resumed study holds both):
# readers accept every prefix here, the first one winning when a run has both.
OUTCOME_PREFIX, OLD_OUTCOME_PREFIX = "outcome.", "outcome/"
OUTCOME_PREFIXES = (OUTCOME_PREFIX, OLD_OUTCOME_PREFIX)


def outcome_key(name: str) -> str:
    """The metric key a run's outcome `name` is logged under."""
    return OUTCOME_PREFIX + name


def outcome_name(key: str) -> Optional[str]:
    """The outcome's name of a metric key written under any prefix (new or old), else None."""
    for prefix in OUTCOME_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def outcomes(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's outcomes by name, from its metrics under either prefix (the current one wins)."""
    out: dict[str, float] = {}
    for prefix in reversed(OUTCOME_PREFIXES):  # the current prefix last: it overwrites
        out.update({k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)})
    return out


def artifact_url(experiment_id: str, run_id: str, path: str) -> str:
    """The UI route (hash part) of a run's artifact, opened in the model-training layout (a run
    page without `workflowType` shows the GenAI layout until the user picks one)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?{LAYOUT_QUERY}"


def study_runs_url(experiment_id: str) -> str:
    """The UI route of the study's "Study runs" view (written at launch and by `runner.py ui`;
    before that the address opens the plain runs list)."""
    return f"#/experiments/{experiment_id}/runs?{LAYOUT_QUERY}&viewStateShareKey={RUNS_KEY}"


def siblings_url(experiment_id: str, cell_id: str) -> str:
    """The UI route of the counted runs of one cell (its seeds), sorted by seed: MLflow 3.17's
    runs page reads its search facets (`searchFilter`, `orderByKey`) from the address."""
    q = urllib.parse.urlencode({"searchFilter": f"tags.cell_id = '{cell_id}' and {COUNTED}",
                                "orderByKey": "tags.`seed`", "orderByAsc": "true"},
                               quote_via=urllib.parse.quote)
    return f"#/experiments/{experiment_id}/runs?{LAYOUT_QUERY}&{q}"


def md_escape(text: str) -> str:
    """Free text for an MLflow description (showdown Markdown): brackets escaped, so that a CI
    written `[95% CI -0.1, +0.1] (context)` stays text instead of a link to `/context`."""
    return re.sub(r"(?<!\\)([\[\]])", r"\\\1", text)  # (one already escaped stays so)


def latest_launch(client, experiment_id: str, with_report: bool = False):
    """The study's most recent launch run (None if none); `with_report`: the most recent one a
    report was logged to (tag `report`: report/report.html, report/report.md before)."""
    where = "tags.kind = 'launch'" + (" and tags.report LIKE 'report/%'" if with_report else "")
    runs = client.search_runs([experiment_id], where, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None
