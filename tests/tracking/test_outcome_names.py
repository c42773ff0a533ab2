"""Outcome metric names on the MLflow store: written as `outcome.<name>` (a dot, so a run page's
curve sections come before them: ablations/tracking/names.py), read under that name and under
the older `outcome/<name>`; and the saved chart views leave out what is the same in every run.

The tiny study (2 x 2 fixes from the fixed recipe, 2 seeds: nothing diverges) is launched once.
Its store is then copied twice: with every outcome renamed to the old prefix (a store written
before this change) and with half of the runs renamed (a study resumed across the change).
Every reader (reads.finished_runs, analysis.load_runs and its effects, both paths of
stored_runs) must give the same answer on all three; the run keys must not move.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from ablations.design.spec import load_spec
from ablations.results import analysis
from ablations.tracking import reads, stored_runs
from ablations.tracking.names import OLD_OUTCOME_PREFIX, OUTCOME_PREFIX, outcome_name, outcomes
from ablations.tracking.ui import views

pytestmark = pytest.mark.usefixtures("workers_one_thread")
RUNS = 8


def _renamed(src: Path, dst: Path, every: int) -> str:
    """A copy of the store at src with the outcomes of every `every`-th run under the old prefix;
    its tracking URI."""
    dst.mkdir()
    shutil.copy(src, dst / "mlflow.db")
    con = sqlite3.connect(dst / "mlflow.db")
    with con:
        ids = [r[0] for r in con.execute("SELECT run_uuid FROM tags WHERE key = 'kind' AND "
                                         "value = 'run' ORDER BY run_uuid")][::every]
        q = ",".join("?" * len(ids))
        for table in ("metrics", "latest_metrics"):
            n = con.execute(f"UPDATE {table} SET key = ? || substr(key, ?) WHERE key LIKE ? AND "
                            f"run_uuid IN ({q})", [OLD_OUTCOME_PREFIX, len(OUTCOME_PREFIX) + 1,
                                                   OUTCOME_PREFIX + "%", *ids]).rowcount
            assert n > 0, table
    con.close()
    return f"sqlite:///{dst}/mlflow.db"


@pytest.fixture(scope="module")
def study(tmp_path_factory, make_stores, tiny_study):
    d = tmp_path_factory.mktemp("names")
    st = make_stores(d)
    spec = load_spec(tiny_study(d, "names"))
    res, _ = st.launch(spec)
    assert (res.done, res.gave_up) == (RUNS, 0)
    return SimpleNamespace(stores=st, spec=spec, new=st.tracking,
                           old=_renamed(d / "mlflow.db", d / "old", 1),
                           mixed=_renamed(d / "mlflow.db", d / "mixed", 2))


def test_names_take_either_prefix_the_current_one_first():
    assert outcome_name("outcome.steps") == outcome_name("outcome/steps") == "steps"
    assert outcome_name("train/loss") is None and outcome_name("final_val_f1") is None
    assert outcomes({"outcome/a": 1.0, "outcome.b": 2.0, "diverged": 0.0}) == {"a": 1.0, "b": 2.0}
    assert outcomes({"outcome/a": 1.0, "outcome.a": 2.0}) == {"a": 2.0}  # the current one wins


def test_runs_log_outcomes_under_the_dot(study):
    for r in study.stores.runs(study.spec, "run"):
        keys = set(r.data.metrics)
        assert {"outcome.steps", "outcome.final_val_f1", "final_val_f1", "diverged"} <= keys
        assert not [k for k in keys if k.startswith(OLD_OUTCOME_PREFIX)]
        assert not [k for k in keys if "/" not in k and not k.startswith(OUTCOME_PREFIX)
                    and k not in ("final_val_f1", "diverged")], keys  # Model metrics: outcomes


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("run_id")[sorted(df.columns)].reset_index(drop=True)


@pytest.mark.parametrize("store", ["old", "mixed"])
def test_an_old_or_a_mixed_store_reads_the_same(study, store):
    uri = getattr(study, store)
    new = reads.finished_runs(study.spec.name, study.new)
    assert len(new) == RUNS and "steps" in new and "nonfinite_events" in new
    pd.testing.assert_frame_equal(_frame(reads.finished_runs(study.spec.name, uri)), _frame(new))
    a, b = analysis.load_runs(study.spec.name, study.new), analysis.load_runs(study.spec.name, uri)
    pd.testing.assert_frame_equal(_frame(b), _frame(a))
    assert sorted(b["run_key"]) == sorted(a["run_key"])  # the same runs, the same keys
    factors = [f.name for f in study.spec.factors]
    pd.testing.assert_frame_equal(analysis.main_effects(b, factors),
                                  analysis.main_effects(a, factors))


def _stored(runs: list) -> list:
    return sorted((sorted(r.params.items()), r.status, sorted(r.metrics.items()), r.start_time)
                  for r in runs)


def test_stored_runs_read_either_prefix_on_both_paths(study):
    want = _stored(stored_runs._read_sqlite(study.new[len("sqlite:///"):], 5000))
    assert len(want) == RUNS and all(dict(m)["steps"] > 0 for _, _, m, _ in want)
    assert not [k for _, _, m, _ in want for k, _ in m if "/" in k or "." in k]  # names only
    for uri in (study.new, study.old, study.mixed):
        assert _stored(stored_runs._read_sqlite(uri[len("sqlite:///"):], 5000)) == want, uri
        assert _stored(stored_runs._read_mlflow(uri, 5000)) == want, uri  # (a server's path)


def _view(client, experiment_id: str, key: str) -> dict:
    import json

    tag = client.get_experiment(experiment_id).tags[views.PREFIX + key]
    return views.inflate(json.loads(tag)["state"])


def test_the_finished_studys_views_leave_out_constant_outcomes(study):
    client = study.stores.client
    eid = client.get_experiment_by_name(study.spec.name).experiment_id
    runs = study.stores.runs(study.spec, "run")
    assert {r.data.metrics["diverged"] for r in runs} == {0.0}  # nothing diverged
    # written by the launch once its runs were done
    state = _view(client, eid, views.factor_key("bias_init"))
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections[0] == "Study: final F1 by bias_init"  # no divergence rate: all 0
    note = sections[1]
    assert note.startswith(f"not drawn, the same in all {RUNS} runs: diverged 0; "), note
    assert " outcome.*: " in note and "scaler_skips 0" in note and "steps 6" in note, note
    assert sections.index("train") < sections.index("val") < sections.index(views.MODEL_METRICS)
    assert views.OLD_SECTION not in sections  # no run carries outcome/ names
    cards = {c["metricKey"]: c for c in state["compareRunCharts"]}
    assert cards["diverged"]["deleted"] and not cards["final_val_f1"]["deleted"]
    assert cards["outcome.scaler_skips"]["deleted"]
    assert "outcome.final_val_f1" not in cards  # it varies: MLflow adds its card, drawn
    assert all(c["deleted"] for k, c in cards.items() if k.startswith("outcome"))
    cols = _view(client, eid, views.RUNS_KEY)["selectedColumns"]
    assert "metrics.`outcome.nonfinite_events`" in cols and not [c for c in cols if "/" in c]


def test_views_of_an_old_store_show_its_names(study):
    from mlflow.tracking import MlflowClient

    layout = views.StudyLayout([("bias_init", True), ("plain_residual", True)], "final_val_f1")
    new = views.from_store(layout, study.stores.client, _eid(study.stores.client, study), RUNS)
    client = MlflowClient(study.old)
    old = views.from_store(layout, client, _eid(client, study), RUNS)
    assert new.prefixes == (OUTCOME_PREFIX,)
    assert old.prefixes == (OUTCOME_PREFIX, OLD_OUTCOME_PREFIX)  # a resume writes the new ones
    assert old.constant == new.constant and old.runs == new.runs == RUNS
    assert "diverged" in old.constant and "outcome.steps" in old.constant
    state = views.views(old)[views.factor_key("bias_init")][1]
    section = {s["name"]: s["uuid"] for s in state["compareRunSections"]}
    cards = {c["metricKey"]: c for c in state["compareRunCharts"]}
    assert cards["outcome/steps"]["deleted"] and cards["outcome.steps"]["deleted"]
    assert cards["outcome/steps"]["metricSectionId"] == section[views.OLD_SECTION]
    assert cards["outcome.steps"]["metricSectionId"] == section[views.MODEL_METRICS]
    cols = views.views(old)[views.RUNS_KEY][1]["selectedColumns"]
    assert {"metrics.`outcome.nonfinite_events`", "metrics.`outcome/nonfinite_events`"} <= set(cols)
    unfinished = views.from_store(layout, client, _eid(client, study), RUNS + 1)
    assert unfinished.constant == {} and unfinished.runs == 0  # a run still to come: all drawn


def _eid(client, study) -> str:
    return client.get_experiment_by_name(study.spec.name).experiment_id
