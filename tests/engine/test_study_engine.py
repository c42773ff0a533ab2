"""The study engine end to end (ablations/launch, queue, worker, trial, progress): a real Optuna SQLite storage and a real MLflow SQLite store.

Every study here trains a tiny network (2 epochs x 3 steps on 4 short synthetic songs), so a run
takes a fraction of a second; what costs time is the stores. An empty, migrated MLflow database
is made once per module and copied (MLflow's schema migrations take ~5 s per fresh database).
"""

import csv
import io
import json
import math
import statistics
import time
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from ablations.design import designs
from ablations.engine import progress, queue
from ablations.engine import trial as trial_module
from ablations.engine.storage import open_storage
from ablations.engine.study import load_study, plan_of
from ablations.design.spec import load_spec
from model.config import TrainConfig
from model.train import train as real_train

EPOCHS, STEPS_PER_EPOCH = 2, 3  # the tiny study's (tests/conftest.py)
DIVERGE = "optimizer: sgd, lr: 1e6, grad_clip: null, nonfinite: stop"

# (the 2 x 2 study with 2 seeds the grid tests launch is the tiny study as it comes)
pytestmark = pytest.mark.usefixtures("workers_one_thread")


def by_run_key(trials) -> dict:
    out = {}
    for t in trials:
        out.setdefault(t.user_attrs["run_key"], []).append(t)
    return out


def test_the_tiny_study(tiny_study, tmp_path):
    from ablations.design import designs
    from ablations.design.spec import load_spec

    tiny = load_spec(tiny_study(tmp_path, "t"))
    assert (tiny.design, tiny.baseline, tiny.objective_metric) == (
        "full_factorial", "fixed", "final_val_f1")
    assert [f.name for f in tiny.factors] == ["bias_init", "plain_residual"]
    assert not tiny.stress_factors and len(designs.runs(tiny)) == 2 * 2 * 2
    run = designs.runs(tiny)[0].config
    assert (run.epochs, run.steps_per_epoch, run.n_songs) == (EPOCHS, STEPS_PER_EPOCH, 4)
    mine = load_spec(tiny_study(tmp_path, "u", "factors: {lr: [1e-4, 3e-3]}\nseeds: [0]\n",
                                "dropout: 0.2"))
    assert [f.name for f in mine.factors] == ["lr"] and list(mine.seeds) == [0]
    assert designs.runs(mine)[0].config.dropout == 0.2


# ------------------------------------------------------------------- a 2x2 study, launched
@pytest.fixture(scope="module")
def grid(tmp_path_factory, make_stores, tiny_study):
    d = tmp_path_factory.mktemp("grid")
    st = make_stores(d)
    spec = load_spec(tiny_study(d, "grid2x2"))
    first, out1 = st.launch(spec)
    launches_after_first = st.runs(spec, "launch")
    children_after_first = st.runs(spec, "run")
    trials_after_first = st.trials(spec)
    second, out2 = st.launch(spec)
    return SimpleNamespace(stores=st, spec=spec, first=first, out1=out1, second=second, out2=out2,
                           launches=launches_after_first, children=children_after_first,
                           trials=trials_after_first, plan=designs.runs(spec))


def test_grid_launch_result(grid):
    r = grid.first
    assert (r.total, r.done, r.gave_up, r.interrupted) == (8, 8, 0, False)
    assert len([l for l in grid.out1.splitlines() if l.startswith("[")]) == 8
    assert "[8/8]" in grid.out1
    assert len(r.summary) == 4 and all(c["runs"] == 2 for c in r.summary)


def test_grid_optuna_has_one_complete_trial_per_run(grid):
    trials = grid.trials
    assert len(trials) == 8
    # optuna-dashboard labels the objective with its metric's name
    study = optuna.load_study(study_name=grid.spec.name, storage=grid.stores.storage)
    assert study.metric_names == [grid.spec.objective_metric]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    keys = [t.user_attrs["run_key"] for t in trials]
    assert len(set(keys)) == 8
    assert set(keys) == {r.run_key for r in grid.plan}
    for t in trials:
        assert t.user_attrs["mlflow_run_id"]
        cfg = TrainConfig.from_overrides(json.loads(t.user_attrs["config"]))
        assert designs.config_key(cfg) == t.user_attrs["run_key"]
        labels = dict(kv.split("=") for kv in t.user_attrs["cell"].split())
        assert {k: t.params[k] for k in labels} == labels
        # the seed is a user attribute, not a hyperparameter (optuna-dashboard would rank it)
        assert "seed" not in t.params and t.user_attrs["seed"] == cfg.seed
        assert t.value == t.user_attrs["objective"]
        assert t.user_attrs["status"] in ("converged", "collapsed", "recovered")


def test_grid_mlflow_parent_and_children(grid):
    st, spec = grid.stores, grid.spec
    exp = st.client.get_experiment_by_name("grid2x2")
    assert exp is not None and exp.experiment_id == grid.first.experiment_id
    assert str(st.dir / "mlruns") in exp.artifact_location
    assert len(grid.launches) == 1
    parent = grid.launches[0]
    assert parent.info.run_id == grid.first.parent_run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["runs_done"] == 8.0
    children = grid.children
    assert len(children) == 8
    trial_by_run = {t.user_attrs["mlflow_run_id"]: t for t in grid.trials}
    assert {c.info.run_id for c in children} == set(trial_by_run)
    for c in children:
        tags, t = c.data.tags, trial_by_run[c.info.run_id]
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["kind"] == "run"
        assert tags["fix.plain_residual"] == t.params["plain_residual"]
        assert tags["fix.plain_residual"] in ("on", "off")
        assert tags["seed"] == str(t.user_attrs["seed"])
        assert tags["cell_id"] == t.user_attrs["cell_id"]
        assert tags["run_key"] == t.user_attrs["run_key"]
        assert tags["optuna_trial"] == str(t.number)
        assert tags["threads"] == "1"  # what it trained with (this module pins one thread)
        assert tags["status"] == t.user_attrs["status"]
        assert c.info.status == "FINISHED"
        assert float(c.data.params["lr"]) == json.loads(t.user_attrs["config"])["lr"]
        # fixes as params too (parallel coordinates), no empty tag, the seed first in the name
        assert c.data.params["fix.plain_residual"] == tags["fix.plain_residual"]
        assert all(v != "" for v in tags.values()), tags
        assert c.info.run_name == f"s{tags['seed']} {tags['cell']}"
    # the launch run's description until a report is logged
    assert "**8/8 runs done** (complete)" in parent.data.tags["mlflow.note.content"]


def test_grid_metric_histories(grid):
    client = grid.stores.client
    for c in grid.children:
        rid = c.info.run_id
        assert c.data.tags["status"] != "diverged"
        loss = client.get_metric_history(rid, "train/loss")
        assert sorted(m.step for m in loss) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
        f1 = client.get_metric_history(rid, "val/chorus_f1")
        assert sorted(m.step for m in f1) == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
        m = c.data.metrics
        assert m["outcome.steps"] == EPOCHS * STEPS_PER_EPOCH and m["outcome.epochs"] == EPOCHS
        assert "outcome.final_val_f1" in m and "outcome.max_grad_norm" in m
        assert m["outcome.final_val_f1"] == pytest.approx(max(f1, key=lambda x: x.step).value)
        # single values at step 0 (MLflow draws them as bars), the headline one rounded
        assert [h.step for h in client.get_metric_history(rid, "outcome.final_val_f1")] == [0]
        assert m["final_val_f1"] == float(f"{m['outcome.final_val_f1']:.3g}")
        assert m["diverged"] == 0.0


def test_grid_objective_is_the_logged_outcome(grid):
    metrics = {c.info.run_id: c.data.metrics for c in grid.children}
    for t in grid.trials:
        assert t.value == pytest.approx(metrics[t.user_attrs["mlflow_run_id"]]["outcome.final_val_f1"])


def test_grid_artifacts(grid):
    st = grid.stores
    c = grid.children[0]
    rid = c.info.run_id
    assert {a.path for a in st.client.list_artifacts(rid)} == {
        "curves.csv", "nonfinite_events.csv", "result.json"}
    rows = list(csv.reader(io.StringIO(st.text(rid, "curves.csv"))))
    assert rows[0] == ["step", "metric", "value"]
    assert len(rows) - 1 == EPOCHS * STEPS_PER_EPOCH * 4 + EPOCHS * 4
    def strict(const):  # bare NaN / Infinity are not JSON
        raise AssertionError(f"result.json holds {const}")

    result = json.loads(st.text(rid, "result.json"), parse_constant=strict)
    assert result["status"] == c.data.tags["status"]
    assert result["steps"] == EPOCHS * STEPS_PER_EPOCH
    events = st.text(rid, "nonfinite_events.csv").splitlines()
    # the original six columns first; forensics, lead-up etc. follow (model.nonfinite.EVENT_COLUMNS)
    assert events[0].split(",")[:6] == ["step", "epoch", "kind", "action", "loss", "grad_norm"]


def test_grid_relaunch_is_a_noop(grid):
    st, spec = grid.stores, grid.spec
    r = grid.second
    assert (r.total, r.done, r.gave_up, r.interrupted) == (8, 8, 0, False)
    assert "(8 done" in grid.out2
    assert not [l for l in grid.out2.splitlines() if l.startswith("[")]  # nothing trained
    trials = st.trials(spec)
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {c.info.run_id for c in st.runs(spec, "run")} == {c.info.run_id for c in grid.children}
    status = progress.study_status(spec, st.storage)
    assert (status["done"], status["total"], status["queued"], status["running"],
            status["given_up"]) == (8, 8, 0, 0, 0)


# ---------------------------------------------------------------- interrupt, then resume
@pytest.fixture(scope="module")
def resumed(tmp_path_factory, make_stores, tiny_study, counting_train):
    d = tmp_path_factory.mktemp("resume")
    st = make_stores(d)
    spec = load_spec(tiny_study(d, "resume2x2"))
    counting = counting_train(fail=lambda n, cfg: KeyboardInterrupt() if n == 3 else None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trial_module, "train", counting)
        first, _ = st.launch(spec)
        trials_between = st.trials(spec)
        second, out2 = st.launch(spec)
    return SimpleNamespace(stores=st, spec=spec, first=first, second=second, out2=out2,
                           trials_between=trials_between, calls=len(counting.calls),
                           trials=st.trials(spec), children=st.runs(spec, "run"),
                           launches=st.runs(spec, "launch"))


def test_interrupt_stops_the_launch_and_keeps_finished_runs(resumed):
    r = resumed.first
    assert r.interrupted is True and r.done == 2 and r.total == 8
    states = [t.state for t in resumed.trials_between]
    assert states.count(TrialState.COMPLETE) == 2
    assert states.count(TrialState.FAIL) == 1
    launch_status = {l.info.run_id: l.info.status for l in resumed.launches}
    assert launch_status[r.parent_run_id] == "KILLED"


def test_resume_finishes_every_run_once(resumed):
    r = resumed.second
    assert (r.interrupted, r.done, r.total, r.gave_up) == (False, 8, 8, 0)
    assert resumed.calls == 9  # 2 + the interrupted one + 6: nothing finished ran twice
    trials = resumed.trials
    assert len(trials) == 9
    groups = by_run_key(trials)
    assert set(groups) == {run.run_key for run in designs.runs(resumed.spec)}
    for key, ts in groups.items():
        assert sum(t.state == TrialState.COMPLETE for t in ts) == 1, key
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    assert failed[0].user_attrs["interrupted"] is True
    again = [t for t in groups[failed[0].user_attrs["run_key"]] if t.state == TrialState.COMPLETE]
    assert again[0].number > failed[0].number
    assert again[0].user_attrs["attempt"] == 1  # an interrupt is not a crashed attempt


def test_interrupted_run_is_killed_in_mlflow(resumed):
    failed = next(t for t in resumed.trials if t.state == TrialState.FAIL)
    child = resumed.stores.client.get_run(failed.user_attrs["mlflow_run_id"])
    assert child.info.status == "KILLED"
    assert child.data.tags["status"] == "interrupted"
    statuses = sorted(c.info.status for c in resumed.children)
    assert statuses == ["FINISHED"] * 8 + ["KILLED"]


def test_requeued_run_keeps_its_cell_labels(resumed):
    """The re-run of the interrupted run must be recorded as that run: its Optuna params and its
    MLflow child's cell/cell_id tags and run name must be those of its own cell and seed."""
    factor_names = [f.name for f in resumed.spec.factors]
    tags = {c.info.run_id: c for c in resumed.children}
    for t in resumed.trials:
        if t.state != TrialState.COMPLETE:
            continue
        labels = dict(kv.split("=") for kv in t.user_attrs["cell"].split())
        assert {k: t.params.get(k) for k in factor_names} == labels, (t.number, t.params)
        assert "seed" not in t.params, (t.number, t.params)
        child = tags[t.user_attrs["mlflow_run_id"]]
        assert child.data.tags["cell_id"] == t.user_attrs["cell_id"], t.number
        assert child.data.tags["cell"] == t.user_attrs["cell"], t.number
        assert child.info.run_name == f"s{t.user_attrs['seed']} {t.user_attrs['cell']}", t.number


# ---------------------------------------------------------------------------- retries
ONE_FIX = """\
design: full_factorial
factors:
  bias_init: [off, on]
seeds: [0]
"""


def broken_bias(cfg) -> bool:
    return cfg.classifier_bias == (0.02, 0.0)


@pytest.mark.optuna_version_free
def test_a_run_that_always_crashes_is_given_up_after_its_retries(tiny_study, counting_train, stores, monkeypatch):
    spec = load_spec(tiny_study(stores.dir, "retry", ONE_FIX + "retries: 1\n"))
    counting = counting_train(
        fail=lambda n, cfg: RuntimeError("boom: verse-biased") if broken_bias(cfg) else None)
    monkeypatch.setattr(trial_module, "train", counting)
    r, out = stores.launch(spec)
    assert (r.total, r.done, r.gave_up, r.interrupted) == (2, 1, 1, False)
    assert "crashed" in out and "boom" in out
    groups = by_run_key(stores.trials(spec))
    bad_key = next(run.run_key for run in designs.runs(spec) if broken_bias(run.config))
    bad = sorted(groups.pop(bad_key), key=lambda t: t.number)
    assert [t.state for t in bad] == [TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["attempt"] for t in bad] == [1, 2]
    for t in bad:
        assert t.user_attrs["interrupted"] is False
        assert "Traceback" in t.user_attrs["error"]
        assert "RuntimeError: boom: verse-biased" in t.user_attrs["error"]
        child = stores.client.get_run(t.user_attrs["mlflow_run_id"])
        assert child.info.status == "FAILED" and child.data.tags["status"] == "crashed"
        assert "error.txt" in {a.path for a in stores.client.list_artifacts(child.info.run_id)}
    (good,) = groups.values()
    assert [t.state for t in good] == [TrialState.COMPLETE]
    assert sum(broken_bias(c) for c in counting.calls) == 2
    status = progress.study_status(spec, stores.storage)
    assert (status["done"], status["given_up"], status["failed_attempts"]) == (1, 1, 2)
    launches = stores.runs(spec, "launch")
    assert [l.info.status for l in launches] == ["FAILED"]

    # launching again does not retry a given-up run
    r2, _ = stores.launch(spec)
    assert (r2.done, r2.gave_up) == (1, 1)
    assert len(counting.calls) == 3
    assert len(stores.trials(spec)) == 3


def test_a_flaky_run_is_retried_and_completes(tiny_study, counting_train, stores, monkeypatch):
    spec = load_spec(tiny_study(stores.dir, "flaky", ONE_FIX))
    failed = []

    def fail(n, cfg):
        if broken_bias(cfg) and not failed:
            failed.append(n)
            return RuntimeError("flaky once")
        return None

    monkeypatch.setattr(trial_module, "train", counting_train(fail=fail))
    r, _ = stores.launch(spec)
    assert (r.total, r.done, r.gave_up, r.interrupted) == (2, 2, 0, False)
    trials = stores.trials(spec)
    bad_key = next(run.run_key for run in designs.runs(spec) if broken_bias(run.config))
    bad = sorted(by_run_key(trials)[bad_key], key=lambda t: t.number)
    assert [t.state for t in bad] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "flaky once" in bad[0].user_attrs["error"]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


@pytest.mark.optuna_version_free
def test_no_retries_means_one_attempt(tiny_study, counting_train, stores, monkeypatch):
    spec = load_spec(tiny_study(stores.dir, "noretry", ONE_FIX + "retries: 0\n"))
    monkeypatch.setattr(trial_module, "train", counting_train(
        fail=lambda n, cfg: RuntimeError("boom") if broken_bias(cfg) else None))
    r, _ = stores.launch(spec)
    assert (r.done, r.gave_up) == (1, 1)
    assert len(stores.trials(spec)) == 2


# ---------------------------------------------------------------------------- divergence
@pytest.mark.optuna_version_free
@pytest.mark.parametrize("objective,worst", [("final_val_f1", 0.0), ("final_val_loss", math.inf)])
def test_a_diverged_run_is_a_result_not_a_crash(tiny_study, counting_train, stores, monkeypatch, objective, worst):
    spec = load_spec(tiny_study(stores.dir, f"diverge_{objective}",
                                 ONE_FIX + f"objective: {objective}\n", base_extra=DIVERGE))
    assert spec.diverged_value() == worst
    plan = designs.runs(spec)
    for run in plan:  # the config really diverges
        assert real_train(run.config).status == "diverged"
    counting = counting_train()
    monkeypatch.setattr(trial_module, "train", counting)
    r, _ = stores.launch(spec)
    assert (r.total, r.done, r.gave_up) == (2, 2, 0)
    assert len(counting.calls) == 2  # not retried
    trials = stores.trials(spec)
    assert len(trials) == 2
    for t in trials:
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["status"] == "diverged"
        assert t.value == worst
        assert t.user_attrs["first_nonfinite_step"] is not None
        rid = t.user_attrs["mlflow_run_id"]
        child = stores.client.get_run(rid)
        assert child.info.status == "FINISHED"
        assert child.data.tags["status"] == "diverged"
        assert child.data.tags["first_nonfinite_step"] == str(t.user_attrs["first_nonfinite_step"])
        loss = stores.client.get_metric_history(rid, "train/loss")
        assert loss and all(math.isfinite(m.value) for m in loss)
        assert max(m.step for m in loss) <= t.user_attrs["first_nonfinite_step"]
        for key in child.data.metrics:  # no metric anywhere holds a NaN/inf
            assert all(math.isfinite(m.value) for m in stores.client.get_metric_history(rid, key)), key
        assert "nonfinite/events" in child.data.metrics
        assert "outcome.final_val_f1" not in child.data.metrics  # NaN: not written
        rows = list(csv.DictReader(io.StringIO(stores.text(rid, "curves.csv"))))
        bad = [row for row in rows if not math.isfinite(float(row["value"]))]
        assert bad and any(row["value"] == "nan" for row in bad)
        assert int(bad[0]["step"]) == t.user_attrs["first_nonfinite_step"]
        events = list(csv.DictReader(io.StringIO(stores.text(rid, "nonfinite_events.csv"))))
        assert events and events[-1]["action"] == "stopped"
    st = progress.study_status(spec, stores.storage)
    assert st["diverged"] == 2 and st["done"] == 2


def test_a_relaunch_counts_runs_in_flight_and_queued_runs_apart(tiny_study, stores, tmp_path):
    """After `run --workers 2` was killed with 2 runs in flight and the rest queued, the next
    launch said "17 in flight elsewhere" for 2 in flight + 15 queued. It must count them apart."""
    spec = load_spec(tiny_study(tmp_path, "counted"))
    _, out = stores.launch(spec, workers=0)
    assert "(0 done, 0 in flight elsewhere, 8 queued, 0 given up)" in out
    study = load_study(spec, open_storage(stores.storage))
    plan = plan_of(spec)
    for _ in range(2):  # two workers claimed a run each, then were killed (heartbeats fresh)
        assert queue.claim(study, plan) is not None
    _, out = stores.launch(spec, workers=0)
    assert "(0 done, 2 in flight elsewhere, 6 queued, 0 given up)" in out


def test_runs_queued_by_an_older_version_of_the_study_are_not_run(tiny_study, counting_train, stores, monkeypatch):
    """Interrupted under one study file, resumed under an edited one: the old queue is dropped
    (FAIL, orphaned), only the current file's runs train and count."""
    old = load_spec(tiny_study(stores.dir, "edited", ONE_FIX))
    counting = counting_train(fail=lambda n, cfg: KeyboardInterrupt() if n == 1 else None)
    monkeypatch.setattr(trial_module, "train", counting)
    r, _ = stores.launch(old)
    assert r.interrupted and r.done == 0
    new = load_spec(tiny_study(stores.dir, "edited", ONE_FIX, base_extra="dropout: 0.2"))
    new_keys = {run.run_key for run in designs.runs(new)}
    assert not new_keys & {run.run_key for run in designs.runs(old)}
    r2, _ = stores.launch(new)
    assert (r2.done, r2.total, r2.gave_up, r2.interrupted) == (2, 2, 0, False)
    assert [c.dropout for c in counting.calls] == [0.1, 0.2, 0.2]
    trials = stores.trials(new)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert {t.user_attrs["run_key"] for t in complete} == new_keys and len(complete) == 2
    orphaned = [t for t in trials if t.user_attrs.get("skipped")]
    assert len(orphaned) == 2 and all(t.state == TrialState.FAIL for t in orphaned)
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]


# ---------------------------------------------------------------------------- workers
@pytest.mark.slow  # ~20 s on a busy 2-core machine: two spawned processes import torch and MLflow
def test_two_worker_processes_run_every_run_once(tiny_study, stores):
    spec = load_spec(tiny_study(stores.dir, "workers2"))
    t0 = time.perf_counter()
    r, out = stores.launch(spec, workers=2)
    elapsed = time.perf_counter() - t0
    assert (r.total, r.done, r.gave_up, r.interrupted) == (8, 8, 0, False), out
    trials = stores.trials(spec)
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_key"] for t in trials}) == 8
    children = stores.runs(spec, "run")
    assert len(children) == 8
    assert all(c.data.tags["mlflow.parentRunId"] == r.parent_run_id for c in children)
    assert {c.data.tags["run_key"] for c in children} == {t.user_attrs["run_key"] for t in trials}
    assert len([l for l in out.splitlines() if l.startswith("[")]) == 8
    print(f"2 workers, 8 runs: {elapsed:.1f} s")


# ---------------------------------------------------------------------------- search
SEARCH = """\
design: {type: search, sampler: tpe}
factors:
  lr: {low: 1e-4, high: 1e-2, log: true}
seeds: [0]
budget: {trials: 3}
"""


def test_search_runs_its_budget_and_resume_does_not_exceed_it(tiny_study, stores):
    spec = load_spec(tiny_study(stores.dir, "search3", SEARCH))
    r, _ = stores.launch(spec)
    assert (r.total, r.done, r.interrupted) == (3, 3, False)
    trials = stores.trials(spec)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert 1e-4 <= t.params["lr"] <= 1e-2
        child = stores.client.get_run(t.user_attrs["mlflow_run_id.0"])
        assert float(child.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert child.data.tags["mlflow.parentRunId"] == r.parent_run_id
    assert len(stores.runs(spec, "run")) == 3
    r2, _ = stores.launch(spec)
    assert r2.done == 3
    assert len(stores.trials(spec)) == 3
    assert len(stores.runs(spec, "run")) == 3


def test_search_trials_that_always_crash_stop_after_the_retries(tiny_study, counting_train, stores, monkeypatch):
    """A search whose every trial crashes must end (at most trials x (retries + 1) attempts), not
    sample new trials for ever."""
    spec = load_spec(tiny_study(stores.dir, "search_crash",
                                 SEARCH.replace("trials: 3", "trials: 2") + "retries: 1\n"))
    guard = 12  # an Interrupt stops a launch that would never end on its own
    counting = counting_train(fail=lambda n, cfg: KeyboardInterrupt() if n >= guard
                             else RuntimeError("always"))
    monkeypatch.setattr(trial_module, "train", counting)
    r, _ = stores.launch(spec)
    assert not r.interrupted, f"launch did not stop by itself: {len(counting.calls)} attempts"
    assert len(counting.calls) <= 2 * (1 + 1)


def test_search_summary_counts_runs_and_its_report_gives_no_verdicts(tiny_study, stores):
    """Issue #13: a search trial is one cell at every seed, so the summary counts runs (not
    trials) and its sd is the spread over seeds; the report gives importance, no verdicts."""
    from ablations.results import report

    body = SEARCH.replace("seeds: [0]", "seeds: [0, 1]").replace("trials: 3", "trials: 2")
    body = body.replace("factors:\n", "factors:\n  layer_norm: [off, on]\n")
    spec = load_spec(tiny_study(stores.dir, "search_seeds", body))
    r, _ = stores.launch(spec)
    assert r.done == 2 and sum(c["runs"] for c in r.summary) == 4
    for t in stores.trials(spec):
        vals = t.user_attrs["seed_values"]
        cell = next(c for c in r.summary if c["cell"] == t.user_attrs["cell"])
        assert len(vals) == 2 and cell["sd"] == pytest.approx(statistics.stdev(vals))
    rep = report.analyse(spec.name, stores.tracking)
    assert rep.design == "search" and rep.verdicts.empty and rep.effects.empty
    assert set(rep.associations["factor"]) == {"layer_norm", "lr"}
    assert rep.associations["runs"].groupby(rep.associations["factor"]).sum().max() == 4


# ------------------------------------------------------------------ where a run happens
def test_a_study_keyed_before_the_device_left_the_key_resumes_with_nothing_rerun(
        tiny_study, counting_train, stores, monkeypatch):
    """The tiny study sets device: cpu, which keys issued before hashed: resumed now, every run
    counts as done under its old key (designs.legacy_key), and none is trained again."""
    spec = load_spec(tiny_study(stores.dir, "placed"))
    assert all(r.legacy_key != r.run_key for r in designs.runs(spec))
    with monkeypatch.context() as mp:
        mp.setattr(designs, "config_key", designs.legacy_key)  # the keys as they were issued
        first, _ = stores.launch(spec)
    assert first.done == 8
    counting = counting_train()
    monkeypatch.setattr(trial_module, "train", counting)
    second, out = stores.launch(spec)
    assert second.done == 8 and counting.calls == [] and "(8 done" in out


def test_the_same_run_on_another_device_is_the_same_run(tiny_study, counting_train, stores,
                                                        monkeypatch):
    spec = load_spec(tiny_study(stores.dir, "moved"))  # device: cpu
    assert stores.launch(spec)[0].done == 8
    counting = counting_train()
    monkeypatch.setattr(trial_module, "train", counting)
    moved = load_spec(tiny_study(stores.dir, "moved", base_extra="device: auto, cache_dir: /x"))
    assert [r.run_key for r in designs.runs(moved)] == [r.run_key for r in designs.runs(spec)]
    again, _ = stores.launch(moved)
    assert again.done == 8 and counting.calls == []
