"""The team server of the README's "Scaling out": `mlflow server --app-name basic-auth`, for real.

One server (SQLite behind it, its users in an SQLite auth database, on 127.0.0.1) is started the
way the README starts it: the admin password and the Flask secret come from environment
variables and an auth config file, never from the command line; the admin creates a user through
MLflow's own client. Then, as the README promises:

  * a client without credentials is refused reads and writes (HTTP 401);
  * a wrong password stops `runner.py run` with one line naming the variable to fix, exit 2, no
    traceback and no password in the output;
  * a user with credentials queues a study (`run --workers 0`) and a `worker` runs it to the end,
    with the Optuna storage URL taken from $CHORUS_STORAGE instead of the command line.

Slow (the server takes ~15 s to start on 2 busy cores, each runner.py process a few seconds):
`.ci/run` runs it with `pytest -m slow`. Skips, saying why, without Flask-WTF (MLflow's `auth`
extra, in this project's dev extra).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask_wtf", reason="mlflow's basic-auth app needs Flask-WTF (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "runner.py"
ADMIN_PW, ALICE_PW = "admin-pw-0123456789", "alice-pw-0123456789"  # >= 12 characters: MLflow's rule
STUDY = """\
name: team
design: full_factorial
factors:
  input_norm: [off, on]
seeds: 1
base: {n_songs: 4, frames: 64, n_features: 8, hidden_dim: 8, n_blocks: 1, epochs: 1,
       steps_per_epoch: 2, batch_size: 4, device: cpu}
"""
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_")) and k != "CHORUS_STORAGE"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("team")
    (d / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = EDIT\n"
        f"database_uri = sqlite:///{d}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
           str(d / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = _clean_env(MLFLOW_AUTH_CONFIG_PATH=str(d / "auth.ini"),
                     MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PW,
                     MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-0123456789",
                     MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
        assert ADMIN_PW.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        admin = subprocess.run(  # the README's way to add a user: MLflow's own client, as admin
            [sys.executable, "-c", "import os, mlflow.server; mlflow.server.get_app_client("
             "'basic-auth', tracking_uri=os.environ['TRACKING']).create_user('alice', "
             "os.environ['NEW_PASSWORD'])"], cwd=d, capture_output=True, text=True, timeout=120,
            env=_clean_env(TRACKING=url, NEW_PASSWORD=ALICE_PW, MLFLOW_TRACKING_USERNAME="admin",
                           MLFLOW_TRACKING_PASSWORD=ADMIN_PW))
        assert admin.returncode == 0, admin.stderr
        (d / "team.yaml").write_text(STUDY)
        yield {"url": url, "dir": d}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _status(url: str, method: str = "GET", body: bytes | None = None,
            auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(
            f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_without_credentials_reads_and_writes_are_refused(server):
    api = server["url"] + "/api/2.0/mlflow"
    read = api + "/experiments/search?max_results=10"
    write = (api + "/experiments/create", b'{"name": "intruder"}')
    assert _status(read) == 401
    assert _status(write[0], "POST", write[1]) == 401
    assert _status(read, auth=("alice", "not-her-password")) == 401
    assert _status(read, auth=("alice", ALICE_PW)) == 200  # the same request, authenticated
    assert _status(server["url"] + "/ajax-api/2.0/mlflow/runs/search", "POST",
                   b'{"experiment_ids": ["0"]}') == 401  # the UI's own API too


def _runner(server, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=server["dir"],
                          capture_output=True, text=True, timeout=600, env=_clean_env(**env))


def test_wrong_password_is_one_clear_line(server):
    p = _runner(server, "run", "team.yaml", "--tracking-uri", server["url"], "--workers", "0",
                CHORUS_STORAGE=f"sqlite:///{server['dir']}/wrong.db",
                MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="not-her-password")
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "refused the credentials (HTTP 401)" in lines[0], lines
    assert "check MLFLOW_TRACKING_PASSWORD for user 'alice'" in lines[0], lines
    assert "Traceback" not in p.stderr and "not-her-password" not in p.stdout + p.stderr
    p = _runner(server, "run", "team.yaml", "--tracking-uri", server["url"], "--workers", "0",
                CHORUS_STORAGE=f"sqlite:///{server['dir']}/wrong.db")
    assert p.returncode == 2 and "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in \
        p.stderr, p.stderr


def test_a_worker_with_credentials_runs_the_study(server):
    creds = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": ALICE_PW,
             "CHORUS_STORAGE": f"sqlite:///{server['dir']}/optuna.db"}  # not on the command line
    queued = _runner(server, "run", "team.yaml", "--tracking-uri", server["url"], "--workers", "0",
                     **creds)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    worker = _runner(server, "worker", "team.yaml", "--tracking-uri", server["url"], "--no-wait",
                     **creds)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    from mlflow.tracking import MlflowClient

    with _credentials("alice", ALICE_PW):
        client = MlflowClient(server["url"])
        exp = client.get_experiment_by_name("team")
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert all(r.data.tags.get("worker") for r in runs)  # (the queuer trains nothing: --workers 0)


@contextlib.contextmanager
def _credentials(user: str, password: str):
    """MLflow's client reads its credentials from the environment on every request."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict(zip(keys, (user, password))))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
