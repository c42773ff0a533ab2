"""How a study reads in the MLflow UI, without a browser: run names, headline metrics, strict
JSON, the saved views' states, when a view is (re)written, stale launches closed.

The browser side (the views drawn, the bars, the description) is tests/tracking/ui/test_ui_browser.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ablations.tracking.ui import views
from ablations.design.designs import Cell
from ablations.design.spec import parse_spec
from ablations.tracking.tracker import (PROCESS_ID, StudyTracker, _strict_json, headline_metrics,
                                run_name, run_tags)
from model.train import TrainResult

SPEC = parse_spec({"name": "v", "design": "full_factorial",
                   "factors": {"input_norm": ["off", "on"], "lr": [1e-3, 1e-2]}, "seeds": 2},
                  "<test>")


def test_run_name_puts_the_seed_first():
    cell = Cell((("input_norm", True), ("lr", 1e-3)))
    assert run_name(SPEC, cell, 1) == f"s1 {cell.label(SPEC.factors)}"
    assert run_name(SPEC, cell, 1).startswith("s1 input_norm=on ")


def test_run_tags_have_no_empty_value():
    tags = run_tags(SPEC, Cell((("input_norm", True), ("lr", 1e-3))), 0, "k", 3, "h:1", 1)
    assert "roles" not in tags and all(v != "" for v in tags.values())
    assert tags["seed"] == "0" and tags["run_key"] == "k"


def test_headline_metrics_count_a_diverged_run_as_the_analysis_does():
    ok = TrainResult("converged", 10, 1, final_val_f1=0.912345678)
    assert headline_metrics(SPEC, ok) == {"diverged": 0.0, "final_val_f1": 0.912}
    bad = TrainResult("diverged", 3, 1)  # final_val_f1 NaN
    assert headline_metrics(SPEC, bad) == {"diverged": 1.0, "final_val_f1": 0.0}
    loss = parse_spec({"name": "l", "design": "full_factorial", "factors": {"lr": [1e-3, 1e-2]},
                       "seeds": 1, "objective": {"metric": "final_val_loss",
                                                 "direction": "minimize"}}, "<t>")
    out = headline_metrics(loss, TrainResult("converged", 10, 1, final_val_f1=0.5,
                                             final_val_loss=0.123456))
    assert out["final_val_loss"] == 0.123 and out["final_val_f1"] == 0.5
    assert "final_val_loss" not in headline_metrics(loss, bad)  # inf: not a metric value


def test_strict_json_turns_non_finite_into_null():
    v = _strict_json({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x")})
    assert json.dumps(v, allow_nan=False) == '{"a": null, "b": [1.0, null, {"c": null}], "d": [2, "x"]}'


LAYOUT = views.StudyLayout([("input_norm", True), ("lr", False)], "final_val_f1", 44)


def test_views_show_counted_runs_and_group_per_factor():
    vs = views.views(LAYOUT)
    assert list(vs) == ["chorus-study-runs", "chorus-all-attempts", "chorus-by-input_norm",
                        "chorus-by-lr"]
    name, runs = vs["chorus-study-runs"]
    assert name == "Study runs" and runs["searchFilter"] == views.COUNTED
    assert vs["chorus-all-attempts"][1]["searchFilter"] == ""  # killed attempts a filter away
    assert runs["runsHiddenMode"] == "SHOW_ALL"  # charts see every run, not the first 10 or 20
    cols = runs["selectedColumns"]
    assert cols[:4] == ["tags.`status`", "metrics.`final_val_f1`", "tags.`fix.input_norm`",
                        "params.`lr`"] and "tags.`seed`" in cols
    assert runs["columnWidths"][views.NAME_COL] == views.name_width(44) >= 7 * 44
    _, by_fix = vs["chorus-by-input_norm"]
    assert by_fix["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "fix.input_norm"}]
    assert vs["chorus-by-lr"][1]["groupBy"]["groupByKeys"] == [{"mode": "param",
                                                                "groupByData": "lr"}]
    cards = by_fix["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in cards] == [("BAR", "final_val_f1"),
                                                             ("BAR", "diverged")]
    first = by_fix["compareRunSections"][0]
    assert all(c["metricSectionId"] == first["uuid"] for c in cards)
    assert views.inflate(views.deflate(by_fix)) == by_fix


class _Exp:
    def __init__(self, tags):
        self.experiment_id, self.tags = "1", tags


class _Client:
    def __init__(self):
        self.written = {}

    def set_experiment_tag(self, eid, key, value):
        self.written[key] = value


def test_views_are_written_when_absent_or_ours_and_unedited():
    key = views.PREFIX + views.RUNS_KEY
    client = _Client()
    views.write_views(client, _Exp({}), LAYOUT)
    assert len(client.written) == 4 and json.loads(client.written[key])["name"] == "Study runs"
    old = json.dumps({"name": "Study runs", "createdAt": 1, "updatedAt": 1, "state": "x"})
    edited = json.dumps({"name": "Study runs", "createdAt": 1, "updatedAt": 2, "state": "x"})
    current = client.written[key]
    # ours, unedited, of this version but another state (the study has finished since: its
    # constant outcomes are left out of the charts): rewritten; a newer version's: left alone
    finished = views.StudyLayout(LAYOUT.factors, LAYOUT.objective, LAYOUT.longest_name,
                                 runs=8, constant={"diverged": 0.0})
    by = views.factor_key("input_norm")
    assert views.views(finished)[by][1] != views.views(LAYOUT)[by][1]
    stale = {**json.loads(current), "state": views.deflate(views.views(finished)[by][1])}
    newer = {**json.loads(current), "chorusVersion": views.VIEW_VERSION + 1, "state": "x"}
    for tag, rewritten in ((old, True), (edited, False), (current, False),
                           (json.dumps(stale), True), (json.dumps(newer), False)):
        client = _Client()
        views.write_views(client, _Exp({key: tag}), LAYOUT)
        assert (key in client.written) == rewritten, tag


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = StudyTracker(f"sqlite:///{tmp_path}/mlflow.db", "stale")
    t.ensure_experiment("a study", {})
    return t


def test_stale_launches_are_closed_live_ones_kept(tracker):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = PROCESS_ID.rsplit(":", 1)[0]
    gone = tracker.start_launch("gone", {}, {})
    tracker.client.set_tag(gone, "launched_by", f"{host}:{dead.pid}")
    alive = tracker.start_launch("alive", {}, {})  # this process: still running
    remote = tracker.start_launch("remote", {}, {})
    tracker.client.set_tag(remote, "launched_by", "another-host:1")
    assert tracker.close_stale_launches() == 1
    status = {r: tracker.client.get_run(r).info.status for r in (gone, alive, remote)}
    assert status == {gone: "KILLED", alive: "RUNNING", remote: "RUNNING"}
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # training layout


def test_md_escape_keeps_intervals_text_not_links():
    s = views.md_escape("change +0.240 [95% CI +0.142, +0.338] (context) | a \\[kept\\]")
    assert s == "change +0.240 \\[95% CI +0.142, +0.338\\] (context) | a \\[kept\\]"
    assert views.md_escape("no brackets") == "no brackets"


def test_run_links_lead_to_the_study_the_cells_seeds_and_the_report():
    from urllib.parse import parse_qs

    from ablations.tracking.notes import run_links

    back = run_links("7", "abc123", "launch1")
    study, seeds, rep = [part.split("](")[1].rstrip(")") for part in back.split(" | ")]
    assert study == "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=" \
                    "chorus-study-runs"
    route, query = seeds.split("?", 1)
    q = parse_qs(query)
    assert route == "#/experiments/7/runs" and q["orderByKey"] == ["tags.`seed`"]
    assert q["searchFilter"] == [f"tags.cell_id = 'abc123' and {views.COUNTED}"]
    assert rep == "#/experiments/7/runs/launch1/artifacts/report/report.html?" \
                  "workflowType=machine_learning"
    assert "report" not in run_links("7", "abc123", None)  # no launch run: no report link


class _Recorder:
    def __init__(self):
        self.metrics = []

    def log_batch(self, run_id, metrics=(), **_):
        self.metrics += list(metrics)


def test_constant_lr_is_not_charted_a_varying_one_is_and_spikes_are_named():
    from ablations.tracking.tracker import SPIKES_KEY, ChildRun

    flat = ChildRun(_Recorder(), "r")
    for step in range(1, 4):
        flat.log({"train/loss": 1.0 / step, "train/lr": 5e-4}, step)
    flat.log({"nonfinite/spikes": 1.0}, 3)
    flat.flush()
    keys = [m.key for m in flat.client.metrics]
    assert "train/lr" not in keys and keys.count("train/loss") == 3
    assert SPIKES_KEY in keys and "nonfinite/spikes" not in keys
    assert [r[1] for r in flat.rows].count("train/lr") == 3  # curves.csv keeps every value
    warm = ChildRun(_Recorder(), "r")
    for step, lr in enumerate([1e-4, 1e-4, 2e-4, 3e-4], start=1):
        warm.log({"train/lr": lr}, step)
    warm.flush()
    assert [(m.step, m.value) for m in warm.client.metrics] == [
        (1, 1e-4), (2, 1e-4), (3, 2e-4), (4, 3e-4)]  # every step, the held ones too


def test_tracking_refusals_say_which_variable_to_fix(monkeypatch):
    from ablations.engine.study import _tracking_refusal

    e401 = Exception("API request to endpoint /x failed with error code 401 != 200. Response")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert _tracking_refusal(e401).endswith("set MLFLOW_TRACKING_USERNAME and "
                                            "MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    msg = _tracking_refusal(e401)
    assert "check MLFLOW_TRACKING_PASSWORD for user 'alice'" in msg and "s3cret" not in msg
    assert "HTTP 403" in _tracking_refusal(Exception("failed with error code 403 != 200"))
    assert _tracking_refusal(ConnectionError("refused")).startswith("cannot reach the tracking")


def test_factorial_studies_tell_optuna_dashboard_its_importance_is_not_the_analysis():
    optuna = pytest.importorskip("optuna")
    dash = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard (dev extra)")
    from ablations.engine.launch import dashboard_note, write_dashboard_note

    study = optuna.create_study(study_name="v")
    write_dashboard_note(study, SPEC)
    note = dash.get_note(study)
    assert note.startswith("**Not the analysis.**") and "runner.py report <test>" in note
    write_dashboard_note(study, SPEC)  # unchanged: not written again
    assert dash.get_note(study) == note
    search = parse_spec({"name": "s", "design": "search", "factors": {"lr": [1e-3, 1e-2]},
                         "seeds": 1, "budget": {"trials": 2}}, "<t>")
    assert dashboard_note(search) is None  # importance is a search study's analysis
