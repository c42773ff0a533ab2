"""ablations/engine/storage.py and the fault paths of the queue, workers and tracking, on real stores, in-process.

SQLite tests run everywhere; the PostgreSQL ones need the server `.ci/postgres` starts (they
skip without it, and fail in CI where CHORUS_REQUIRE_POSTGRES is set). The multi-process
scenarios are in test_scaling.py.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import sqlalchemy.orm
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import pgdb
from ablations.engine import launch as launching
from ablations.engine import progress, queue
from ablations.tracking import retry
from ablations.engine import storage as st
from ablations.engine import worker
from ablations.engine.study import load_study, plan_of
from ablations.design.spec import load_spec
from ablations.tracking.tracker import ChildRun, StudyTracker

RUNNER = Path(__file__).resolve().parents[2] / "runner.py"
ONE_FIX = "factors: {plain_residual: [off, on]}\nseeds: [0]\n"  # the tiny study, 2 runs


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setenv("CHORUS_HEARTBEAT_S", "1")
    monkeypatch.setenv("CHORUS_GRACE_S", "2")


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """A failing test fails in seconds, not after 2 minutes of retries; one torch thread."""
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("CHORUS_STORAGE_RETRY_S", "20")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Queued:
    """A tiny 2-run study queued (`run --workers 0`) on SQLite stores in tmp_path."""

    def __init__(self, tmp_path: Path, study: Path):
        self.spec = load_spec(study)
        self.storage = f"sqlite:///{tmp_path}/o.db"
        self.tracking = f"sqlite:///{tmp_path}/m.db"
        launching.launch(self.spec, self.storage, self.tracking, workers=0, out=io.StringIO())
        self.study = load_study(self.spec, st.open_storage(self.storage))
        self.plan = plan_of(self.spec)

    def claim(self):
        """Claim a run as a worker would (and then 'die': nobody beats its heartbeat)."""
        return queue.claim(self.study, self.plan)


def new_study(url: str, name: str = "s") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=st.open_storage(url))


# ------------------------------------------------------------------------------ retrying
def test_sqlite_locked_is_retried_until_the_lock_is_released(tmp_path, capsys):
    """A real exclusive lock held for 1.5 s by another connection; the storage's own busy
    timeout is 0.1 s, so only the retry can carry the write through."""
    db = tmp_path / "o.db"
    storage = st.RetryingRDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.1}})
    study = optuna.create_study(study_name="s", storage=storage)
    trial_id = storage.create_new_trial(study._study_id)
    holder = sqlite3.connect(db, timeout=5, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.5, holder.rollback).start()
    before = st.RetryingRDBStorage.retries
    t0 = time.monotonic()
    storage.set_trial_user_attr(trial_id, "k", "v")
    assert time.monotonic() - t0 >= 1.2
    assert st.RetryingRDBStorage.retries > before
    assert storage.get_trial(trial_id).user_attrs["k"] == "v"
    assert "database is locked" in capsys.readouterr().err


def test_a_fault_that_is_not_transient_is_raised_at_once(tmp_path):
    storage = st.open_storage(f"sqlite:///{tmp_path}/o.db")
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no such study")
    assert time.monotonic() - t0 < 1


def test_a_retried_enqueue_that_had_committed_is_not_enqueued_twice(tmp_path, monkeypatch):
    """The write commits, then the connection drops before the answer: the retry must find the
    trial by its enqueue_id instead of creating a second one."""
    storage = st.open_storage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(study_name="s", storage=storage)
    real = optuna.storages.RDBStorage._create_new_trial
    calls = []

    def commit_then_drop(self, study_id, template_trial=None):
        calls.append(1)
        trial = real(self, study_id, template_trial)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the "
                                                                          "connection"))
        return trial

    monkeypatch.setattr(optuna.storages.RDBStorage, "_create_new_trial", commit_then_drop)
    study.enqueue_trial({"x": 1}, user_attrs={"enqueue_id": "abc"})
    trials = study.get_trials()
    assert len(calls) == 1 and len(trials) == 1  # found, not created again
    assert trials[0].user_attrs["enqueue_id"] == "abc" and trials[0].state == TrialState.WAITING


# ------------------------------------------------------------------- bulk enqueue, claims
FIELDS = ("state", "params", "distributions", "system_attrs", "datetime_start",
          "datetime_complete", "values", "intermediate_values")


def test_bulk_enqueue_writes_what_enqueue_trial_writes(tmp_path):
    """enqueue_trials writes Optuna's own rows: the trials read back like enqueue_trial's, are
    numbered on, and Optuna's own pop (ask) takes them in order with their fixed params."""
    check_bulk_enqueue(f"sqlite:///{tmp_path}/o.db")


def check_bulk_enqueue(url: str) -> None:
    storage = st.open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    attrs = {"run_key": "k0", "seed": 0, "attempt": 1, "config": '{"lr": 0.001, "x": [1, 2]}'}
    study.enqueue_trial({"lr": "0.001", "seed": 0}, user_attrs={**attrs, "enqueue_id": "a"})
    n = storage.enqueue_trials(study._study_id, [
        ({"lr": "0.001", "seed": 0}, {**attrs, "enqueue_id": "b"}),
        ({"lr": "0.01", "seed": 1}, {**attrs, "run_key": "k1", "enqueue_id": "c"})])
    assert n == 2
    one, bulk, last = study.get_trials()
    assert [t.number for t in (one, bulk, last)] == [0, 1, 2]
    assert {f: getattr(bulk, f) for f in FIELDS} == {f: getattr(one, f) for f in FIELDS}
    assert {**bulk.user_attrs, "enqueue_id": "a"} == one.user_attrs
    assert last.user_attrs["run_key"] == "k1" and last.system_attrs["fixed_params"]["lr"] == "0.01"
    popped = [study.ask() for _ in range(3)]
    assert [t.number for t in popped] == [0, 1, 2]
    assert popped[2].suggest_categorical("lr", ["0.001", "0.01"]) == "0.01"


def test_a_retried_bulk_enqueue_that_had_committed_is_not_enqueued_twice(tmp_path, monkeypatch):
    """The transaction commits, then the connection drops before the answer: the retry finds
    the first trial's enqueue_id and adds nothing."""
    from sqlalchemy.orm import SessionTransaction

    storage = st.open_storage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(study_name="s", storage=storage)
    real, calls = SessionTransaction.commit, []

    def commit_then_drop(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the "
                                                                          "connection"))
        return out

    monkeypatch.setattr(SessionTransaction, "commit", commit_then_drop)
    before = st.RetryingRDBStorage.retries
    n = storage.enqueue_trials(study._study_id, [({"x": i}, {"enqueue_id": f"e{i}"})
                                                 for i in range(5)])
    monkeypatch.undo()
    assert n == 5 and st.RetryingRDBStorage.retries == before + 1
    trials = study.get_trials()
    assert [t.user_attrs["enqueue_id"] for t in trials] == [f"e{i}" for i in range(5)]
    assert [t.number for t in trials] == list(range(5))


def test_reconcile_queues_a_plan_once_in_bulk_and_claims_take_it_in_order(tiny_study, tmp_path, monkeypatch):
    """Every run of the plan becomes one WAITING trial (none through enqueue_trial), a second
    reconcile adds nothing, and claims pop them first in first out, each once."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(tiny_study(tmp_path, "b", ONE_FIX + "seeds: 6\n"))
    study = load_study(spec, st.open_storage(f"sqlite:///{tmp_path}/o.db"), create=True)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", None)  # the bulk path only
    plan = plan_of(spec)
    first = queue.reconcile(study, plan)
    assert len(first.enqueued) == 12 and not first.queued
    again = queue.reconcile(study, plan)
    assert not again.enqueued and sorted(again.queued) == sorted(r.run_key for r in plan)
    claimed = [queue.claim(study, plan) for _ in range(12)]
    assert [t.number for t in claimed] == list(range(12))
    assert [t.user_attrs["run_key"] for t in claimed] == [r.run_key for r in plan]
    assert queue.claim(study, plan) is None
    # the claimed trials are known to Optuna's cache: a suggest works, states read back right
    assert claimed[3].suggest_categorical("plain_residual", ["off", "on"]) == "off"
    assert claimed[3].user_attrs["seed"] == plan[3].seed == 3
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}


def test_a_retried_tell_that_had_committed_counts_as_done(tmp_path, monkeypatch):
    storage = st.open_storage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = []

    def commit_then_drop(self, trial_id, state, values=None):
        calls.append(1)
        ok = real(self, trial_id, state, values)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("connection reset"))
        return ok

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", commit_then_drop)
    study.tell(trial, 0.5)
    assert len(calls) == 2
    assert study.get_trials()[0].state == TrialState.COMPLETE and study.get_trials()[0].value == 0.5


def test_a_retried_pop_is_ours_only_if_our_try_committed(tmp_path, monkeypatch):
    """A fault after a pop's commit: the retry finds the trial RUNNING with this claim's token
    (ours). A fault before the commit while another worker popped the trial meanwhile (the fault
    also dropped queue_lock's connection): RUNNING too, but with the other's token (not ours)."""
    storage = st.open_storage(f"sqlite:///{tmp_path}/p.db")
    study = optuna.create_study(study_name="p", storage=storage)
    for i in range(2):
        study.enqueue_trial({"x": i})
    first, second = [t._trial_id for t in study.get_trials()]
    dropped = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    real_session = sqlalchemy.orm.Session
    calls = []

    class Faulty(real_session):  # the first try: commit (or not), then the connection "drops"
        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            calls.append(1)
            if len(calls) == 1:
                raise dropped
            return out

    monkeypatch.setattr(sqlalchemy.orm, "Session", Faulty)
    assert storage.pop_trial(first, "mine") is True  # committed, then the fault: ours
    assert storage.get_trial(first).state == TrialState.RUNNING

    calls.clear()
    real_pop = st.RetryingRDBStorage.pop_trial
    monkeypatch.setattr(sqlalchemy.orm, "Session", real_session)

    class Lost(real_session):
        def __enter__(self):
            if not calls:
                calls.append(1)
                real_pop(storage, second, "theirs")  # another worker, its lock free meanwhile
                raise dropped
            return super().__enter__()

    monkeypatch.setattr(sqlalchemy.orm, "Session", Lost)
    assert storage.pop_trial(second, "mine") is False  # RUNNING, but not ours
    monkeypatch.setattr(sqlalchemy.orm, "Session", real_session)
    assert storage.get_trial(second).system_attrs["claim"] == "theirs"


def test_transient_faults_are_told_from_configuration_errors():
    locked = sqlalchemy.exc.OperationalError("x", {}, sqlite3.OperationalError("database is locked"))
    no_table = sqlalchemy.exc.OperationalError("x", {}, sqlite3.OperationalError("no such table: t"))
    dropped = sqlalchemy.exc.OperationalError("x", {}, Exception(
        "terminating connection due to administrator command"))
    refused = sqlalchemy.exc.OperationalError("x", {}, Exception(
        'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused'))
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit")
    wrapped.__cause__ = dropped
    assert retry.is_transient(locked) and not retry.is_transient(no_table)
    assert retry.is_transient(dropped) and retry.is_transient(wrapped)
    assert retry.is_dropped(dropped) and not retry.is_dropped(refused)  # opening: refused is an error
    wrapped_refused = optuna.exceptions.StorageInternalError("An exception is raised during the commit")
    wrapped_refused.__cause__ = refused
    assert retry.is_transient(wrapped_refused) and not retry.is_dropped(wrapped_refused)
    assert not retry.is_transient(ValueError("x"))


def test_heartbeat_settings_are_validated(monkeypatch):
    monkeypatch.setenv("CHORUS_GRACE_S", "soon")
    with pytest.raises(retry.StoreError, match=r"CHORUS_GRACE_S='soon': must be a whole number"):
        st.open_storage("sqlite:///:memory:")


# ---------------------------------------------------------------------------- lost workers
def test_a_lost_workers_run_is_failed_marked_killed_and_run_again(tiny_study, tmp_path, monkeypatch,
                                                                  fast_heartbeat):
    """A worker claims a run, creates its MLflow run and dies (no more heartbeats): the next
    launch fails the trial as lost, marks its MLflow run KILLED and runs it again."""
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "lost", ONE_FIX))
    spec, storage_url, tracking, study = q.spec, q.storage, q.tracking, q.study
    trial = q.claim()
    tracker = StudyTracker(tracking, spec.name)
    dead = tracker.client.create_run(tracker.experiment_id, tags={
        "kind": "run", "optuna_trial": str(trial.number)}).info.run_id
    time.sleep(3)  # > CHORUS_GRACE_S without a heartbeat
    out = io.StringIO()
    res = launching.launch(spec, storage_url, tracking, workers=1, out=out)
    assert (res.done, res.total, res.gave_up) == (2, 2, 0)
    trials = study.get_trials()
    lost = [t for t in trials if t.user_attrs.get("lost")]
    assert [t.number for t in lost] == [trial.number] and lost[0].state == TrialState.FAIL
    assert "worker lost: no heartbeat for over 2 s" in lost[0].user_attrs["error"]
    again = [t for t in trials if t.state == TrialState.COMPLETE
             and t.user_attrs["run_key"] == lost[0].user_attrs["run_key"]]
    assert len(again) == 1 and again[0].user_attrs["attempt"] == 2  # a lost worker is a crash
    assert tracker.client.get_run(dead).info.status == "KILLED"
    st_ = progress.study_status(spec, storage_url)
    assert (st_["done"], st_["running"], st_["failed_attempts"]) == (2, 0, 1)


def test_a_worker_waits_for_a_run_in_flight_elsewhere_and_reruns_it_when_lost(tiny_study, 
        tmp_path, monkeypatch, fast_heartbeat):
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "wait", ONE_FIX))
    spec, storage_url, tracking, study = q.spec, q.storage, q.tracking, q.study
    dead = q.claim()  # then "dies"
    # The dead worker's last beat lands as the live one finishes its own run, so the lost run is
    # in flight (not yet stale) when the live worker runs out of queued runs, however long that
    # run took on a loaded machine: the worker must wait, then re-run it once it goes stale.
    from ablations.engine import trial as trial_mod

    real_train = trial_mod.train

    def train_then_beat(*a, **kw):
        res = real_train(*a, **kw)
        st.handles(study)[0].record_heartbeat(st.trial_id_of(dead))
        return res

    monkeypatch.setattr(trial_mod, "train", train_then_beat)
    out = io.StringIO()
    n = worker.work(launching.join(spec, storage_url, tracking), out=out)
    assert n == 2  # its own run, then the lost one once it went stale
    assert "waiting: 1 run(s) in flight" in out.getvalue()
    assert "re-queued 1 run(s) of lost workers" in out.getvalue()
    assert progress.count_done(study, plan_of(spec)) == 2


@pytest.mark.optuna_version_free
def test_a_worker_with_no_wait_leaves_runs_in_flight_to_others(tiny_study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "nowait", ONE_FIX))
    spec, storage_url, tracking, study = q.spec, q.storage, q.tracking, q.study
    q.claim()
    (running,) = progress.study_status(spec, storage_url)["in_flight"]  # who runs what, for `status`
    assert running["worker"] == queue.WORKER_ID and running["seed"] == 0
    assert 0 <= running["running_s"] < 60
    ctx = launching.join(spec, storage_url, tracking, wait=False)
    assert worker.work(ctx, out=io.StringIO()) == 1


def test_a_duplicate_queued_run_is_skipped_while_the_run_is_running(tiny_study, tmp_path, monkeypatch):
    """Two WAITING trials for one run (e.g. two launches reconciling at once on an old version):
    the second is popped while the first runs and is skipped, not run twice."""
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "dup", ONE_FIX))
    spec, storage_url, tracking, study = q.spec, q.storage, q.tracking, q.study
    plan = plan_of(spec)
    queue.enqueue_run(study, spec, plan[0], attempt=1)  # a duplicate of the first run
    first = queue.claim(study, plan)
    second = queue.claim(study, plan)
    assert first.user_attrs["run_key"] == plan[0].run_key
    assert second.user_attrs["run_key"] == plan[1].run_key
    assert queue.claim(study, plan) is None  # the duplicate was passed over
    skipped = [t for t in study.get_trials() if t.user_attrs.get("skipped")]
    assert len(skipped) == 1 and "already running in another worker" in skipped[0].user_attrs["skipped"]


# ------------------------------------------------------------------------------ tracking
@pytest.mark.optuna_version_free
def test_a_failed_flush_keeps_the_buffer_and_the_retry_writes_it_once(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    child = ChildRun(client, run_id)
    for step in range(5):
        child.log({"train/loss": 1.0 / (step + 1)}, step)
    real, fails = client.log_batch, [2]

    def flaky(*a, **kw):
        if fails[0]:
            fails[0] -= 1
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed "
                                  "with exception ConnectionError: Connection refused")
        return real(*a, **kw)

    monkeypatch.setattr(client, "log_batch", flaky)
    with pytest.raises(MlflowException):  # no time to wait: raised, buffer kept
        child.flush(budget_s=0)
    assert len(child.buffer) == 5
    child.flush(budget_s=30)  # second failure retried after 0.5 s, then written
    assert child.buffer == []
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == \
        [1.0 / (s + 1) for s in range(5)]
    assert "tracking: log metrics failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the CLI
def runner(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


@pytest.mark.parametrize("args, expect", [
    (["--storage", "sqlite:///nothing.db"], "study 'cli' not found: sqlite:///nothing.db does not exist"),
    (["--storage", "postgresql://chorus@127.0.0.1:1/x"],
     "--storage postgresql://chorus@127.0.0.1:1/x: cannot open the Optuna storage"),
    (["--device", "cuda:x"], "--device cuda:x: must be auto, cpu, cuda or cuda:N"),
    (["--threads", "0"], "--threads 0: must be >= 1"),
])
@pytest.mark.optuna_version_free
def test_worker_bad_input_is_one_line_before_any_training(tiny_study, tmp_path, args, expect):
    tiny_study(tmp_path, "cli", ONE_FIX)
    t0 = time.monotonic()
    line = one_line_error(runner(tmp_path, "worker", "cli.yaml", *args))
    assert expect in line, line
    assert time.monotonic() - t0 < 60  # no minutes of retries on a store that is not there


@pytest.mark.optuna_version_free
def test_run_with_no_workers_only_queues(tiny_study, tmp_path):
    tiny_study(tmp_path, "cli", ONE_FIX)
    p = runner(tmp_path, "run", "cli.yaml", "--workers", "0")
    assert p.returncode == 0, p.stderr
    assert "0/2 runs done; the rest are queued" in p.stdout
    assert "python runner.py worker cli.yaml --storage sqlite:///optuna.db" in p.stdout
    s = runner(tmp_path, "status", "cli.yaml")
    assert "0/2 done, 0 running, 2 queued" in s.stdout
    # a worker pointed at the wrong tracking store says so before training anything
    line = one_line_error(runner(tmp_path, "worker", "cli.yaml", "--tracking-uri", "http://127.0.0.1:1"))
    assert "--tracking-uri http://127.0.0.1:1: cannot reach the tracking store" in line
    line = one_line_error(runner(tmp_path, "worker", "cli.yaml", "--tracking-uri", "sqlite:///other.db"))
    assert "--tracking-uri sqlite:///other.db: no such MLflow store" in line
    assert not (tmp_path / "other.db").exists()
    # --threads pins the count (bit-for-bit repeats); each run says what it trained with
    w = runner(tmp_path, "worker", "cli.yaml", "--threads", "1", "--no-wait")
    assert w.returncode == 0, w.stderr
    assert "2 queued, 0 running elsewhere; 1 thread(s)" in w.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("cli")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    assert len(runs) == 2 and {r.data.tags["threads"] for r in runs} == {"1"}


# ---------------------------------------------------------------------------- PostgreSQL
@pytest.fixture
def pg_url():
    yield from pgdb.fresh_database("unit")


def test_postgres_bulk_enqueue_and_the_queue_queries(pg_url):
    """The same rows on PostgreSQL (one INSERT ... RETURNING for the trials), and the claim's
    queries: the oldest waiting trials, the states of one run's trials."""
    check_bulk_enqueue(pg_url)
    storage = st.open_storage(pg_url)
    study = optuna.load_study(study_name="s", storage=storage)
    storage.enqueue_trials(study._study_id, [({"x": i}, {"run_key": f"r{i % 2}"}) for i in range(4)])
    ids = st.waiting_trial_ids(study._storage, study._study_id, limit=3)
    assert ids == sorted(ids) and len(ids) == 3
    assert [storage.get_trial(i).number for i in ids] == [3, 4, 5]
    states = st.trial_states_by_user_attr(study._storage, study._study_id, "run_key", "r1")
    assert len(states) == 2 and set(states.values()) == {TrialState.WAITING}


def test_postgres_queue_lock_is_held_by_one_holder_at_a_time(pg_url):
    study = new_study(pg_url, "locked")
    order, inside = [], threading.Event()

    def holder() -> None:
        s2 = st.open_storage(pg_url)
        with st.queue_lock(s2, "locked"):
            inside.set()
            time.sleep(1.0)
            order.append("first out")

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    t0 = time.monotonic()
    with st.queue_lock(study._storage, "locked"):
        order.append("second in")
        waited = time.monotonic() - t0
    t.join()
    assert order == ["first out", "second in"] and waited > 0.5
    with st.queue_lock(study._storage, "other study"):  # another study's lock is independent
        pass


def test_postgres_storage_survives_its_connections_being_killed(pg_url):
    storage = st.open_storage(pg_url)
    study = optuna.create_study(study_name="k", storage=storage)
    for i in range(5):
        assert pgdb.terminate_connections(pg_url) >= 1 or i  # the pooled connection dies
        study.enqueue_trial({"x": i}, user_attrs={"enqueue_id": f"e{i}"})
    assert [t.user_attrs["enqueue_id"] for t in study.get_trials()] == [f"e{i}" for i in range(5)]


def test_postgres_study_runs_in_process(tiny_study, pg_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_study(tmp_path, "pgs", ONE_FIX)
    spec = load_spec(tmp_path / "pgs.yaml")
    res = launching.launch(spec, pg_url, f"sqlite:///{tmp_path}/m.db", out=io.StringIO())
    assert (res.done, res.total) == (2, 2)
    again = launching.launch(spec, pg_url, f"sqlite:///{tmp_path}/m.db", out=io.StringIO())
    assert again.done == 2 and len(optuna.load_study(study_name="pgs", storage=pg_url).get_trials()) == 2


@pytest.mark.optuna_version_free
def test_a_worker_device_overrides_where_runs_execute_not_what_they_are(tiny_study, tmp_path, monkeypatch):
    """`--device` changes the device every run trains on (recorded in MLflow), never the run's
    identity: the run keys, and so what counts as done, stay those of the study file."""
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "dev", ONE_FIX, "device: auto"))
    spec, storage_url, tracking = q.spec, q.storage, q.tracking
    assert worker.work(launching.join(spec, storage_url, tracking, device="cpu"),
                        out=io.StringIO()) == 2
    study = load_study(spec, st.open_storage(storage_url))
    assert progress.count_done(study, plan_of(spec)) == 2
    runs = StudyTracker(tracking, "dev").client.search_runs(
        [StudyTracker(tracking, "dev").experiment_id], "tags.kind = 'run'")
    assert [r.data.params["device"] for r in runs] == ["cpu", "cpu"]
    assert {r.data.tags["run_key"] for r in runs} == {r.run_key for r in plan_of(spec)}
    assert all(":" in r.data.tags["worker"] for r in runs)


@pytest.mark.optuna_version_free
def test_worker_device_cuda_without_cuda_is_one_line(tiny_study, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    tiny_study(tmp_path, "cli", ONE_FIX)
    line = one_line_error(runner(tmp_path, "worker", "cli.yaml", "--device", "cuda:1"))
    assert "--device cuda:1: 'cuda:1' asked for but CUDA is not available here" in line


@pytest.mark.optuna_version_free
def test_sigterm_stops_a_worker_like_ctrl_c_and_requeues_its_run(tiny_study, tmp_path):
    """A scheduler pre-empting a job sends SIGTERM: the run in flight is re-queued at once (not
    after the heartbeat grace period) and its MLflow run marked KILLED; exit code 130."""
    import signal

    tiny_study(tmp_path, "term", ONE_FIX, "steps_per_epoch: 400")
    assert runner(tmp_path, "run", "term.yaml", "--workers", "0").returncode == 0
    p = subprocess.Popen([sys.executable, str(RUNNER), "worker", "term.yaml"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    deadline = time.time() + 60
    while time.time() < deadline:
        ts = optuna.load_study(study_name="term", storage=storage).get_trials()
        if any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in ts):
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert "interrupted: the run in flight was re-queued" in err
    ts = optuna.load_study(study_name="term", storage=storage).get_trials()
    stopped = [t for t in ts if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and stopped[0].user_attrs["interrupted"] is True
    waiting = [t for t in ts if t.state == TrialState.WAITING]
    assert stopped[0].user_attrs["run_key"] in {t.user_attrs["run_key"] for t in waiting}
    assert len(waiting) == 2 and waiting[0].user_attrs["attempt"] == 1  # not counted as a crash
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(stopped[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.optuna_version_free
def test_run_shares_a_device_list_out_between_its_local_workers():
    ctx = worker.WorkerContext(spec=None, storage_url="", tracking_uri="", parent_run_id=None,
                                device="cuda:0,cuda:1")
    assert [launching.worker_context(ctx, i).device for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    one = worker.WorkerContext(spec=None, storage_url="", tracking_uri="", parent_run_id=None,
                                device="cuda:1")
    assert launching.worker_context(one, 5).device == "cuda:1"


@pytest.mark.slow  # ~25 s: a launch with 2 worker processes, stopped, then resumed
def test_sigterm_stops_a_multi_worker_launch_and_the_next_run_resumes(tiny_study, tmp_path):
    """`kill` of `run --workers 2` (started in the background, where a shell ignores SIGINT):
    both workers stop, their runs are re-queued, nothing is left RUNNING, and the same command
    finishes the study with every run counted once."""
    import signal

    tiny_study(tmp_path, "stop", "factors: {plain_residual: [off, on], lr: [1e-4, 3e-3]}\n"
               "seeds: 4\n", "steps_per_epoch: 600")
    args = [sys.executable, str(RUNNER), "run", "stop.yaml", "--workers", "2", "--no-report"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    deadline = time.time() + 120
    while time.time() < deadline:  # both workers busy, at least one run done
        with contextlib.suppress(Exception):
            ts = optuna.load_study(study_name="stop", storage=storage).get_trials()
            if (sum(t.state == TrialState.RUNNING for t in ts) == 2 and
                    any(t.state == TrialState.COMPLETE for t in ts)):
                break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err[-2000:])
    ts = optuna.load_study(study_name="stop", storage=storage).get_trials()
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    done = sum(t.state == TrialState.COMPLETE for t in ts)
    assert 1 <= done < 16
    assert sum(t.state == TrialState.FAIL and t.user_attrs.get("interrupted") for t in ts) == 2
    again = runner(tmp_path, "run", "stop.yaml", "--workers", "2", "--no-report", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"16 runs ({done} done" in again.stdout and "16/16 runs done" in again.stdout
    ts = optuna.load_study(study_name="stop", storage=storage).get_trials()
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(complete) == 16 and len({t.user_attrs["run_key"] for t in complete}) == 16


def test_a_worker_killed_right_after_claiming_a_run_is_still_found_lost(tiny_study, tmp_path, monkeypatch,
                                                                        fast_heartbeat):
    """The claim's commit lands and the worker dies before doing anything else: the heartbeat
    was recorded before the trial turned RUNNING, so the trial still goes stale (Optuna never
    declares a RUNNING trial without a heartbeat stale)."""
    monkeypatch.chdir(tmp_path)
    q = Queued(tmp_path, tiny_study(tmp_path, "gap", ONE_FIX))
    real = st.RetryingRDBStorage.pop_trial

    def commit_then_die(self, trial_id, token):
        real(self, trial_id, token)
        raise KeyboardInterrupt  # stands in for SIGKILL right after the commit

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(st.RetryingRDBStorage, "pop_trial", commit_then_die)
        q.claim()
    (running,) = [t for t in q.study.get_trials() if t.state == TrialState.RUNNING]
    time.sleep(3)  # > CHORUS_GRACE_S
    assert [t.number for t in st.stale_trials(q.study)] == [running.number]
