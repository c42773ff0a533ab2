"""Read a study's runs back from the MLflow store: the tracking layer's half of the analysis
(ablations.results.analysis computes on what this returns and never talks to MLflow itself).

    rows = finished_runs("quick", "sqlite:///mlflow.db")   # one raw row per run, outcomes as logged
    curves = curve_rows("sqlite:///mlflow.db", rows["run_id"], ["train/loss"])   # long format

Which runs count (crashed and interrupted attempts left out, the latest FINISHED run of a key) is
decided here, where the MLflow statuses are read; what the outcomes mean is the analysis's job.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional

import pandas as pd
from mlflow.tracking import MlflowClient

from ablations.design import identity
from ablations.tracking.names import outcomes

# One artifact download per run: MLflow's per-download progress bars would flood notebooks.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _client(tracking_uri: Optional[str]) -> MlflowClient:
    return MlflowClient(tracking_uri) if tracking_uri else MlflowClient()


def _experiment_id(client: MlflowClient, study: str) -> str:
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise KeyError(f"no MLflow experiment named {study!r} in {client.tracking_uri}")
    return exp.experiment_id


def experiment_tags(study: str, tracking_uri: Optional[str] = None) -> dict[str, str]:
    """The study experiment's tags: `study.design`, and `mlflow.note.content` (the description,
    which carries a fraction's generators); {} if there is no such experiment."""
    exp = _client(tracking_uri).get_experiment_by_name(study)
    return dict(exp.tags) if exp is not None else {}


def study_stress(study: str, tracking_uri: Optional[str] = None) -> list[str]:
    """The study's stress factors (the experiment tag `study.stress` written at launch)."""
    tag = experiment_tags(study, tracking_uri).get("study.stress", "")
    return [s for s in tag.split(",") if s]


def finished_runs(study: str, tracking_uri: Optional[str] = None,
                  plan: Optional[Iterable[tuple[str, int]]] = None) -> pd.DataFrame:
    """One row per run of the study: factors, seed, status, outcome metrics as logged (the
    analysis derives its outcome columns from them: ablations.results.analysis.load_runs).

    `plan` ((cell, seed) pairs of the current study file: ablations.results.analysis.plan_cells)
    keeps only those: cells or seeds dropped from the file are then left out. Matching is by
    cell and seed, not by run_key, so runs made before a code change that added a TrainConfig
    field still count; of several runs of one cell x seed (e.g. after editing `base:`), the
    latest counts.

    Columns: run_id, run_key, cell, cell_id, seed, status, roles, first_nonfinite_where,
    start_time, one column per factor (bool for fixes), and the outcome metrics without their
    prefix (`outcome.`, or `outcome/` in a store written before: names.outcomes).
    """
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, study)
    rows = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string="tags.kind = 'run'",
                                  max_results=1000, page_token=token)
        for r in page:
            if r.info.status != "FINISHED" or "status" not in r.data.tags:
                continue  # crashed / interrupted / still running attempts are not results
            t, m = r.data.tags, r.data.metrics
            row = {"run_id": r.info.run_id, "run_key": t.get("run_key"), "cell": t.get("cell", ""),
                   "cell_id": t.get("cell_id"), "seed": int(t.get("seed", -1)),
                   "status": t["status"], "roles": t.get("roles", ""),
                   "first_nonfinite_where": t.get("first_nonfinite_where", ""),
                   "start_time": r.info.start_time}
            row.update(identity.values_of(t))  # the factor values, typed
            row.update(outcomes(m))
            rows.append(row)
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if plan is not None:  # factor order in a label does not matter
        wanted = {(_canonical(c), s) for c, s in plan}
        df = df[[(_canonical(c), s) in wanted for c, s in zip(df["cell"], df["seed"])]]
    # A run recorded twice (e.g. a worker presumed dead that finished anyway): keep the latest.
    df = df.sort_values("start_time").drop_duplicates("run_key", keep="last")
    df = df.drop_duplicates(["cell", "seed"], keep="last")
    return df.reset_index(drop=True)


def load_crashed(study: str, tracking_uri: Optional[str], runs: pd.DataFrame,
                 plan: Optional[Iterable[tuple[str, int]]] = None) -> pd.DataFrame:
    """The runs that crashed past their retries: a FAILED attempt and no FINISHED run of that
    cell x seed. Same columns as `finished_runs` (status 'crashed', no outcome), so a stability
    table can show a crash apart from a failure and from a run that is simply missing."""
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, study)
    done = {(_canonical(c), s) for c, s in zip(runs.get("cell", []), runs.get("seed", []))}
    wanted = {(_canonical(c), s) for c, s in plan} if plan is not None else None
    rows, token = {}, None
    while True:
        page = client.search_runs([exp_id], filter_string="tags.kind = 'run' and "
                                  "attributes.status = 'FAILED'", max_results=1000,
                                  page_token=token)
        for r in page:
            t = r.data.tags
            key = (_canonical(t.get("cell", "")), int(t.get("seed", -1)))
            if key in done or (wanted is not None and key not in wanted):
                continue
            rows[key] = {"cell": t.get("cell", ""), "seed": key[1], "status": "crashed",
                         "roles": t.get("roles", ""), **identity.values_of(t)}
        token = page.token
        if not token:
            break
    return pd.DataFrame(list(rows.values()))


def _canonical(cell: str) -> str:
    return " ".join(sorted(cell.split()))


def curve_rows(tracking_uri: Optional[str], run_ids: Iterable[str], metrics: Iterable[str]
               ) -> pd.DataFrame:
    """Long format (run_id, step, metric, value) of the runs' `metrics`, from each run's
    curves.csv artifact (one file per run, not one call per metric)."""
    client = _client(tracking_uri)
    wanted = set(metrics)
    frames = []
    for run_id in run_ids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = client.download_artifacts(run_id, "curves.csv")
        c = pd.read_csv(path)
        c = c[c["metric"].isin(wanted)]
        c.insert(0, "run_id", run_id)
        frames.append(c)
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)
