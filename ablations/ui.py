"""`runner.py ui`: the MLflow UI for a study's tracking store, on 127.0.0.1 only.

Started with the fast settings measured here: one worker and job execution off (about 10 s to the
first answer instead of 21 s with MLflow's defaults on 2 cores). Ctrl-C stops the server and every
process it started (it runs in its own process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Optional


def ui_command(tracking_uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def start(tracking_uri: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(ui_command(tracking_uri, port), env=env, start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its children (uvicorn/gunicorn workers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def experiment_url(tracking_uri: str, port: int, study: Optional[str]) -> str:
    base = f"http://127.0.0.1:{port}"
    if not study:
        return base
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(study)
    return f"{base}/#/experiments/{exp.experiment_id}" if exp else base


def serve(tracking_uri: str, port: int, study: Optional[str]) -> int:
    proc = start(tracking_uri, port)
    try:
        if not wait_ready(port, proc):
            print(f"error: the MLflow UI did not start on 127.0.0.1:{port} (is the port in use?)",
                  file=sys.stderr)
            return 1
        print(f"MLflow UI: {experiment_url(tracking_uri, port, study)}  (Ctrl-C to stop)", flush=True)
        proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
