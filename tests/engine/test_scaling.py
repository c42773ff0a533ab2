"""Many workers on a shared PostgreSQL study: every run exactly once, whatever fails.

Real components only: the PostgreSQL server `.ci/postgres` starts, `runner.py` worker processes,
an `mlflow server` process with a PostgreSQL backend. Each test gets fresh databases. The
multi-process tests are slow (each process imports torch, MLflow and Optuna: ~5 s on a busy
2-core machine); they run in CI's `pytest -m slow` pass.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablations.results import analysis
import pgdb as pg

RUNNER = Path(__file__).resolve().parents[2] / "runner.py"
FACTORS = "factors: {plain_residual: [off, on], lr: [1e-4, 3e-3]}\nseeds: 6\n"  # 24 runs
N_RUNS = 24
# quick fault detection (seconds): a killed worker's run is re-run 4-5 s later, not 60-70 s
FAST_HEARTBEAT = {"CHORUS_HEARTBEAT_S": "1", "CHORUS_GRACE_S": "4"}


@pytest.fixture
def optuna_db():
    yield from pg.fresh_database("optuna")


@pytest.fixture
def mlflow_db():
    yield from pg.fresh_database("mlflow")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **extra}


def runner(cwd: Path, *args: str, environ=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), *args], cwd=cwd, env=environ or env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (p.returncode, out[-3000:], err[-6000:])
    return out, err


def queue(study: Callable[..., Path], d: Path, storage: str, tracking: str,
          steps: int = 10) -> None:
    """Queue the 24 runs (`study`: the tiny_study fixture; `steps` per epoch: how long a run
    lasts, so that a fault can land mid-run)."""
    study(d, "s24", FACTORS, f"steps_per_epoch: {steps}")
    out, _ = finish(runner(d, "run", "s24.yaml", "--workers", "0", "--storage", storage,
                           "--tracking-uri", tracking))
    assert "24 runs (0 done" in out and "queued; start workers" in out


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s24", storage=storage).get_trials()


def wait_for_complete(storage: str, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until n runs are COMPLETE (the process must still be working)."""
    deadline = time.time() + timeout
    while sum(t.state == TrialState.COMPLETE for t in trials(storage)) < n:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)


def assert_each_run_once(storage: str, tracking: str) -> list:
    """24 COMPLETE trials with 24 distinct runs; 24 FINISHED MLflow runs, one per run, each with
    its whole curve; the analysis counts 24."""
    ts = trials(storage)
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(complete) == N_RUNS
    assert len({t.user_attrs["run_key"] for t in complete}) == N_RUNS
    assert not [t for t in ts if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("s24")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'", max_results=1000)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == N_RUNS
    assert len({r.data.tags["run_key"] for r in finished}) == N_RUNS
    assert {r.info.run_id for r in finished} == {t.user_attrs["mlflow_run_id"] for t in complete}
    for r in finished:  # no run is counted with partial curves
        steps = int(r.data.metrics["outcome.steps"])
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == steps
    assert len(analysis.load_runs("s24", tracking)) == N_RUNS
    return runs


@pytest.mark.slow
def test_three_workers_run_each_run_exactly_once(tiny_study, tmp_path, optuna_db, mlflow_db):
    queue(tiny_study, tmp_path, optuna_db, mlflow_db)
    procs = [runner(tmp_path, "worker", "s24.yaml", "--storage", optuna_db, "--tracking-uri",
                    mlflow_db, "--local-workers", "3") for _ in range(3)]
    outs = [finish(p)[0] for p in procs]
    runs = assert_each_run_once(optuna_db, mlflow_db)
    executed = [int(o.rsplit("worker done: ", 1)[1].split()[0]) for o in outs]
    assert sum(executed) == N_RUNS
    by_worker = collections.Counter(r.data.tags["worker"] for r in runs)
    assert len(by_worker) == 3 and sum(by_worker.values()) == N_RUNS
    assert all(t.state == TrialState.COMPLETE for t in trials(optuna_db))  # not a single retry
    print(f"runs per worker: {sorted(executed)}")


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_recovered_and_each_run_still_counts_once(tiny_study, 
        tmp_path, optuna_db, mlflow_db):
    queue(tiny_study, tmp_path, optuna_db, mlflow_db, steps=30)  # ~1 s runs: a kill lands mid-run
    fast = env(**FAST_HEARTBEAT)
    procs = [runner(tmp_path, "worker", "s24.yaml", "--storage", optuna_db, "--tracking-uri",
                    mlflow_db, "--local-workers", "3", environ=fast) for _ in range(3)]
    victim = procs[0]
    client = MlflowClient(mlflow_db)
    exp_id = client.get_experiment_by_name("s24").experiment_id
    me = f"tags.worker = '{socket.gethostname()}:{victim.pid}'"
    deadline = time.time() + 120
    while time.time() < deadline:
        # Freeze the victim, look: if it is training its second run or later, kill it there.
        # (Checking without freezing races: the run may finish between the look and the kill.)
        victim.send_signal(signal.SIGSTOP)
        if (client.search_runs([exp_id], f"{me} and attributes.status = 'FINISHED'") and
                client.search_runs([exp_id], f"{me} and attributes.status = 'RUNNING'")):
            victim.send_signal(signal.SIGKILL)
            break
        victim.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    else:
        pytest.fail("the victim never started a run")
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    outs = [finish(p)[0] for p in procs[1:]]
    runs = assert_each_run_once(optuna_db, mlflow_db)
    lost = [t for t in trials(optuna_db) if t.user_attrs.get("lost")]
    assert len(lost) == 1, outs
    assert lost[0].state == TrialState.FAIL and "worker lost" in lost[0].user_attrs["error"]
    assert lost[0].user_attrs["attempt"] == 1  # the re-run was attempt 2
    # (looked up by tag: the victim may have died before recording its run id on the trial)
    killed = [r for r in runs if r.data.tags["optuna_trial"] == str(lost[0].number)]
    assert len(killed) == 1, [(r.info.status, r.data.tags) for r in killed]
    killed = killed[0]
    assert killed.info.status == "KILLED" and "worker lost" in killed.data.tags["lost"]
    assert killed.data.tags["worker"].endswith(f":{victim.pid}")
    assert any("re-queued 1 run(s) of lost workers" in o for o in outs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend; stop() and start() at will."""

    def __init__(self, backend: str, d: Path):
        self.backend, self.dir, self.port = backend, d, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(d / "mlflow-server.log", "a")

    def start(self, timeout: float = 90) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--artifacts-destination", str(self.dir / "artifacts")],
            cwd=self.dir, stdout=self.log, stderr=self.log, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job workers
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start: {(self.dir / 'mlflow-server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_tracking_server_stopped_and_restarted_mid_study(tiny_study, tmp_path, optuna_db, mlflow_db):
    server = MlflowServer(mlflow_db, tmp_path)
    server.start()
    try:
        queue(tiny_study, tmp_path, optuna_db, server.url, steps=20)
        # The client gives up on a dead server after 1 retry, so our own retry (with the buffered
        # metrics kept) is what carries the run over the outage.
        launch = runner(tmp_path, "run", "s24.yaml", "--workers", "2", "--no-report",
                        "--storage", optuna_db, "--tracking-uri", server.url,
                        environ=env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                                    CHORUS_TRACKING_RETRY_S="120"))
        wait_for_complete(optuna_db, 6, launch)
        server.stop()
        time.sleep(6)  # runs keep training; their writes fail and are retried
        server.start()
        out, err = finish(launch, timeout=300)
        assert "24/24 runs done" in out
        assert "tracking: " in err and "retrying" in err  # the outage was hit, and survived
        assert_each_run_once(optuna_db, server.url)
    finally:
        server.stop()


@pytest.mark.slow
def test_postgres_connections_dropped_mid_study(tiny_study, tmp_path, optuna_db):
    """Every connection to the study's database is killed every 0.3 s while 2 workers run: the
    storage reconnects and retries; nothing lost, nothing run twice."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    queue(tiny_study, tmp_path, optuna_db, tracking)
    launch = runner(tmp_path, "run", "s24.yaml", "--workers", "2", "--no-report",
                    "--storage", optuna_db, "--tracking-uri", tracking)
    killed, stop = [], threading.Event()

    def chaos() -> None:
        while not stop.is_set():
            killed.append(pg.terminate_connections(optuna_db))
            stop.wait(0.3)

    t = threading.Thread(target=chaos)
    t.start()
    try:
        out, err = finish(launch, timeout=300)
    finally:
        stop.set()
        t.join()
    assert "24/24 runs done" in out
    assert sum(killed) > 10, killed
    assert_each_run_once(optuna_db, tracking)
    print(f"connections killed: {sum(killed)}; storage retries logged: {err.count('storage: ')}")


@pytest.mark.slow
def test_tracking_server_down_for_good_stops_the_worker_without_losing_or_burning_runs(tiny_study, 
        tmp_path, optuna_db, mlflow_db):
    """The server dies and stays down past the retries: the worker re-queues its run in flight
    (not counted as a crash), stops with one line and exit 1; once the server is back, the next
    launch closes the orphaned MLflow run and finishes the study, each run counted once."""
    server = MlflowServer(mlflow_db, tmp_path)
    server.start()
    try:
        queue(tiny_study, tmp_path, optuna_db, server.url, steps=20)
        worker = runner(tmp_path, "worker", "s24.yaml", "--storage", optuna_db, "--tracking-uri",
                        server.url, environ=env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                                                CHORUS_TRACKING_RETRY_S="3"))
        wait_for_complete(optuna_db, 3, worker)
        server.stop()
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 1, (out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: a store is unreachable, retries spent") and \
            "re-queued" in last, err[-2000:]
        assert "Traceback" not in err
        ts = trials(optuna_db)
        assert not [t for t in ts if t.state == TrialState.RUNNING]
        assert all(t.user_attrs["attempt"] == 1 for t in ts)  # no retry was used up
        stopped = [t for t in ts if t.state == TrialState.FAIL]
        assert len(stopped) == 1 and stopped[0].user_attrs["interrupted"] is True
        server.start()
        out, err = finish(runner(tmp_path, "run", "s24.yaml", "--no-report", "--storage",
                                 optuna_db, "--tracking-uri", server.url), timeout=300)
        assert "24/24 runs done" in out
        runs = assert_each_run_once(optuna_db, server.url)
        assert not [r for r in runs if r.info.status == "RUNNING"]  # the orphan was closed
    finally:
        server.stop()
