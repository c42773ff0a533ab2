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
          steps: int = 10, environ=None) -> tuple[str, str]:
    """Queue the 24 runs (`study`: the tiny_study fixture; `steps` per epoch: how long a run
    lasts, so that a fault can land mid-run); the output of `run`."""
    study(d, "s24", FACTORS, f"steps_per_epoch: {steps}")
    out, err = finish(runner(d, "run", "s24.yaml", "--workers", "0", "--storage", storage,
                             "--tracking-uri", tracking, environ=environ))
    assert "24 runs (0 done" in out and "queued; start workers" in out
    return out, err


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


def complete_runs(database_url: str) -> int:
    """COMPLETE trials in the study's database, read on a connection of its own (closed before
    it returns, so that terminate_connections never counts it)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]


@pytest.mark.slow
def test_postgres_connections_dropped_mid_study(tiny_study, tmp_path, optuna_db):
    """Every connection to the study's database is killed each time a run completes, while 2
    workers run: the storage reconnects and retries; nothing lost, nothing run twice.

    The kills are paced by the study's progress, not by the clock: each lands right after a
    run's result commits, when that worker tells, takes the queue lock and pops its next run
    and the other is mid-run. (Killing on a fixed 0.3 s clock made the outcome depend on the
    machine's load: on a busy machine a storage call that needs more than 0.3 s never got
    through, retries ran out, and the study failed; on a fast one the storm missed most of the
    study.) At most one kill per run, so every retry eventually gets through."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    queue(tiny_study, tmp_path, optuna_db, tracking)
    launch = runner(tmp_path, "run", "s24.yaml", "--workers", "2", "--no-report",
                    "--storage", optuna_db, "--tracking-uri", tracking)
    rounds: list[tuple[int, int]] = []  # (runs complete, connections killed) per kill
    errors: list[BaseException] = []
    stop = threading.Event()

    def chaos() -> None:
        try:
            seen = 0
            while not stop.is_set():
                done = complete_runs(optuna_db)
                if seen < done < N_RUNS:
                    rounds.append((done, pg.terminate_connections(optuna_db)))
                seen = done
                stop.wait(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test, not lost in a thread
            errors.append(e)

    t = threading.Thread(target=chaos)
    t.start()
    try:
        out, err = finish(launch, timeout=300)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert "24/24 runs done" in out
    # Several runs' completion points each saw the workers' connections killed (each completion
    # is a new count; two that land between two looks are one kill).
    assert len([k for _, k in rounds if k]) >= N_RUNS // 2, rounds
    assert_each_run_once(optuna_db, tracking)
    print(f"kill rounds: {len(rounds)}; connections killed: {sum(k for _, k in rounds)}; "
          f"storage retries logged: {err.count('storage: ')}")


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


@pytest.fixture
def password_db():
    yield from pg.password_database("team")


def password_file(path: Path, url: str, password: str) -> Path:
    """A libpq password file (mode 0600, or libpq ignores it) for the URL's host, port, database
    and user: hostname:port:database:username:password."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    path.write_text(f"{u.host}:{u.port}:{u.database}:{u.username}:{password}\n")
    path.chmod(0o600)
    return path


class CommandLines:
    """Every process's command line on this machine, sampled every 0.1 s while it runs (what
    `ps` shows every user): the ones holding `secret`, if any."""

    def __init__(self, secret: str):
        self.secret, self.seen, self.bad = secret, 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for p in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    line = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:  # gone meanwhile
                    continue
                self.seen += 1
                if self.secret in line:
                    self.bad.append(line)
            self._stop.wait(0.1)

    def __enter__(self) -> "CommandLines":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_a_password_file_lets_run_and_worker_in_and_the_password_shows_nowhere(
        tiny_study, tmp_path, password_db, monkeypatch):
    """The README's team set-up: the storage URL names the user but no password; libpq reads it
    from $PGPASSFILE (or ~/.pgpass). `run` queues and a `worker` runs the study through a server
    that demands the password; the password is on no command line, in no output, no MLflow tag or
    param, no Optuna attribute. A wrong password in the file: one `error:` line naming the
    storage, exit 2, no traceback, no password shown."""
    url, role, password = password_db
    assert password not in url
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    pgpass = password_file(tmp_path / "pgpass", url, password)
    clean = {k: v for k, v in env().items() if k not in ("PGPASSWORD", "CHORUS_STORAGE")}
    with_file = {**clean, "PGPASSFILE": str(pgpass)}
    printed = []
    with CommandLines(password) as cmdlines:
        printed += queue(tiny_study, tmp_path, url, tracking, environ=with_file)
        printed += finish(runner(tmp_path, "worker", "s24.yaml", "--storage", url,
                                 "--tracking-uri", tracking, environ=with_file))
        printed += finish(runner(tmp_path, "status", "s24.yaml", "--storage", url,
                                 environ=with_file))
    assert "worker done: 24 runs executed here" in printed[2]
    assert "24/24 done" in printed[4], printed[4]
    monkeypatch.setenv("PGPASSFILE", str(pgpass))  # for this process's own look at the stores
    runs = assert_each_run_once(url, tracking)
    assert cmdlines.seen > 100 and not cmdlines.bad, cmdlines.bad  # (it did look)
    assert not [text for text in printed if password in text]
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("s24")
    assert exp.tags["optuna.storage"] == url  # the storage is named, without a password
    everything = client.search_runs([exp.experiment_id], max_results=1000)  # the launch run too
    assert len(everything) > len(runs)
    for r in everything:
        assert not [kv for kv in {**r.data.tags, **r.data.params}.items() if password in str(kv)]
    assert password not in str(exp.tags)
    study = optuna.load_study(study_name="s24", storage=url)
    for t in study.get_trials():
        assert password not in str(t.user_attrs) + str(t.system_attrs)
    assert password not in str(study.user_attrs)

    # Without the file's password the server refuses: one line naming the storage, exit 2.
    wrong = "wrong-" + password[::-1]
    bad_file = password_file(tmp_path / "pgpass-wrong", url, wrong)
    for args in (["worker", "s24.yaml"], ["run", "s24.yaml", "--workers", "1"]):
        p = runner(tmp_path, *args, "--storage", url, "--tracking-uri", tracking,
                   environ={**clean, "PGPASSFILE": str(bad_file)})
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (args, p.returncode, out, err)
        assert "Traceback" not in out + err and wrong not in out + err and password not in out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: --storage {url}: "), err
        assert "password authentication failed" in lines[0], lines[0]
    # The same wrong password in $CHORUS_STORAGE's URL (off the command line) is masked.
    p = runner(tmp_path, "worker", "s24.yaml", "--tracking-uri", tracking,
               environ={**clean, "CHORUS_STORAGE": url.replace("@", f":{wrong}@", 1)})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err and wrong not in out + err, (out, err)
    masked = url.replace("@", ":***@", 1)
    assert err.strip().startswith(f"error: --storage {masked}: "), err
    assert assert_each_run_once(url, tracking)  # the refused commands changed nothing
