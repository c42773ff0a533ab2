"""`runner.py ui` and `runner.py dashboard`: browse a study's results, on 127.0.0.1 only.

`ui` starts the MLflow UI with the fast settings measured here: one worker and job execution off
(about 10 s to the first answer instead of 21 s with MLflow's defaults on 2 cores). Before it
prints the address, it makes each study experiment open as a person wants to see it:

  * the experiment is marked as a model-training one (`mlflow.experimentKind`), and the printed
    address asks for the "Model training" layout (`workflowType=machine_learning`), so the page
    opens on the runs table, not on MLflow 3's GenAI trace overview (MLflow 3.17 drops that
    choice on links to run pages, which then show its GenAI sidebar until the user picks
    "Model training" at the top left; it remembers that pick per browser);
  * a saved view "Study runs" (an experiment tag, as the UI's own "Views > Save as new view"
    writes it) shows the columns that matter: the study's factors (`fix.*` tags for fixes,
    params otherwise), `status`, the objective and the non-finite counts, runs sorted by name
    so the seeds of a cell sit together, and a Run Name column wide enough to read. It is only
    created when absent: a view the user changed in the UI is left alone.

`dashboard` starts optuna-dashboard on the study's Optuna storage.

Both servers run in their own process group (and, on Linux, die with this process even if it is
killed outright): Ctrl-C, SIGTERM or SIGHUP stop the server and every process it started. Server
output goes to a log file (printed) instead of the terminal; a port in use, a store that does not
exist or a server that does not come up is one line on stderr.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

HOST = "127.0.0.1"
VIEW_KEY = "chorus-study-runs"  # the saved view's tag is mlflow.sharedViewState.<VIEW_KEY>
VIEW_NAME = "Study runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
KIND_TAG = "mlflow.experimentKind"
STUDY_TAG = "study.design"  # set on every study experiment by the launcher


class UIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- processes
def port_in_use(port: int, host: str = HOST) -> bool:
    """True if a server could not bind host:port (same SO_REUSEADDR semantics as uvicorn)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_command(tracking_uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", HOST, "--port", str(port), "--workers", "1"]


def dashboard_command(storage: str, port: int) -> list[str]:
    # optuna-dashboard has no `python -m` entry; its script sits beside this interpreter
    script = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    cmd = ([script] if os.path.exists(script) else
           [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"])
    return [*cmd, storage, "--host", HOST, "--port", str(port)]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _child_setup() -> None:  # Linux, in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by _serve around fork
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Start a server in its own process group; stdout and stderr go to log_path.

    On Linux the server gets SIGTERM if this process dies, even by SIGKILL."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup if sys.platform == "linux" else None)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> bool:
    """Poll url until it answers 200, the process exits, or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop the server and every process of its group (uvicorn workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # the group may outlive its leader (a worker still shutting down): no stragglers
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _log_tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-300:]


@dataclass
class Served:
    """What `_serve` prints once the server answers: lines of (label, URL)."""

    links: list[tuple[str, str]]
    note: str = ""


def cmd_name(cmd: list[str]) -> str:
    """'mlflow-ui' or 'optuna-dashboard': the server's name, for its log file."""
    if "mlflow" in cmd:
        return "mlflow-ui"
    return "optuna-dashboard"


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(what: str, cmd: list[str], port: int, ready_path: str,
           links: Callable[[], Served], out=sys.stdout) -> int:
    """Run a server until Ctrl-C / SIGTERM / SIGHUP; always leave no process behind."""
    if port_in_use(port):
        raise UIError(f"port {port} on {HOST} is in use (another UI?); pick another with "
                      f"--port, e.g. --port {free_port()}")
    fd, log_path = tempfile.mkstemp(prefix=f"chorus-{cmd_name(cmd)}-{port}-", suffix=".log")
    os.close(fd)
    # Signals are handled explicitly: a server started from a script (`runner.py ui &`)
    # inherits an ignored SIGINT, and SIGTERM/SIGHUP would otherwise skip the clean-up below.
    base = f"http://{HOST}:{port}"
    proc = None
    clean = False
    previous = {s: signal.signal(s, _raise_interrupt) for s in _STOP_SIGNALS}
    try:
        print(f"starting {what} on {base} (log: {log_path}) ...", file=out, flush=True)
        # Stop signals wait while the server forks: an interrupt cannot leave it unhandled.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc = start(cmd, log_path)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if not wait_ready(base + ready_path, proc):
            code = proc.poll()
            why = (f"exited with code {code}: {_log_tail(log_path)}" if code is not None
                   else "did not answer within 180 s")
            print(f"error: {what} did not start on {base}: {why} (log: {log_path})",
                  file=sys.stderr, flush=True)
            return 1
        served = links()
        for label, url in served.links:
            print(f"{label}: {url}", file=out, flush=True)
        if served.note:
            print(served.note, file=out, flush=True)
        print("Ctrl-C to stop", file=out, flush=True)
        code = proc.wait()
        print(f"error: {what} exited with code {code}: {_log_tail(log_path)} (log: {log_path})",
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        clean = True
        print(f"\nstopping {what} ...", file=out, flush=True)
        return 0
    finally:
        for s in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop(proc)
        for s, h in previous.items():
            signal.signal(s, h)
        if clean:
            try:
                os.unlink(log_path)
            except OSError:
                pass


# ---------------------------------------------------------------------------- MLflow UI
def _sqlite_path(uri: str) -> Optional[str]:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def _check_exists(uri: str, flag: str, hint: str) -> None:
    path = _sqlite_path(uri)
    if path is not None and not os.path.exists(path):
        raise UIError(f"{flag} {uri}: no such database ({os.path.abspath(path)}); {hint}")


def _deflate(state: dict) -> str:
    """The UI's compressed view state: 'deflate;' + base64 of zlib-deflated JSON."""
    raw = json.dumps(state, separators=(",", ":")).encode()
    return "deflate;" + base64.b64encode(zlib.compress(raw)).decode()


def view_state(factor_columns: list[str], objective: Optional[str]) -> dict:
    """The saved view's state, in the MLflow UI's own format (see the module docstring).

    Runs sorted by name list flat (MLflow nests children under their launch run only when
    sorted by creation time), so every cell x seed is visible at once, the seeds of a cell
    side by side, with the launch run (report, figures) among them."""
    metrics = [f"metrics.`outcome/{m}`" for m in dict.fromkeys(
        m for m in (objective, "nonfinite_events", "first_nonfinite_step") if m)]
    columns = ["tags.`status`", *factor_columns, *metrics]
    order = ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns]
    widths = {"attributes.`Run Name`": 320, "runDateAndNestInfo": 130, "duration": 80,
              "tags.`status`": 100, **{c: 120 for c in factor_columns},
              **{c: 150 for c in metrics}}
    return {"searchFilter": "", "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "modelVersionFilter": "All Runs", "selectedColumns": columns, "columnOrder": order,
            "columnWidths": widths, "runsHiddenMode": "FIRST_20_RUNS", "viewMaximized": False,
            "runListHidden": False, "isAccordionReordered": False,
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
            "groupsExpanded": {}, "globalLineChartConfig": {"xAxisKey": "step",
                                                            "lineSmoothness": 0,
                                                            "selectedXAxisMetricKey": ""}}


def _study_columns(client, experiment_id: str) -> tuple[list[str], Optional[str]]:
    """Factor columns and objective metric, read off the study's latest launch run."""
    from ablations.fixes import FIXES

    launches = client.search_runs([experiment_id], "tags.kind = 'launch'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
    if not launches:
        return [], None
    params = launches[0].data.params
    factors = [f for f in params.get("factors", "").split(",") if f]
    columns = [f"tags.`fix.{f}`" if f in FIXES else f"params.`{f}`" for f in factors]
    objective = (params.get("objective") or "").split(" ")[0] or None
    return columns, objective


def prepare_experiment(client, experiment) -> Optional[str]:
    """Mark a study experiment as model training and add the "Study runs" view if absent.

    Returns the view's key (None when it could not be written, e.g. a read-only server)."""
    tags = experiment.tags or {}
    try:
        if KIND_TAG not in tags:
            client.set_experiment_tag(experiment.experiment_id, KIND_TAG,
                                      "custom_model_development")
        if VIEW_TAG not in tags:
            columns, objective = _study_columns(client, experiment.experiment_id)
            now = int(time.time() * 1000)
            client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, json.dumps(
                {"name": VIEW_NAME, "createdAt": now, "updatedAt": now,
                 "state": _deflate(view_state(columns, objective))}))
    except Exception:
        return None
    return VIEW_KEY


def runs_url(port: int, experiment_id: str, view_key: Optional[str]) -> str:
    query = {"workflowType": "machine_learning"}
    if view_key:
        query["viewStateShareKey"] = view_key
    return (f"http://{HOST}:{port}/#/experiments/{experiment_id}/runs?"
            + urllib.parse.urlencode(query))


def study_links(tracking_uri: str, port: int, study: Optional[str]) -> Served:
    """The URL of each study experiment (or of `study`'s), each prepared for browsing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    base = f"http://{HOST}:{port}"
    if study:
        exp = client.get_experiment_by_name(study)
        if exp is None:
            names = [e.name for e in client.search_experiments() if STUDY_TAG in (e.tags or {})]
            return Served([("MLflow UI", base)],
                          f"(no experiment named {study!r} in {tracking_uri}; studies there: "
                          f"{', '.join(names) or 'none'})")
        exps = [exp]
    else:
        exps = [e for e in client.search_experiments(order_by=["last_update_time DESC"])
                if STUDY_TAG in (e.tags or {})]
        if not exps:
            return Served([("MLflow UI", base)], f"(no study in {tracking_uri} yet: run one with "
                                                 f"`python runner.py run studies/quick.yaml`)")
    links = [(f"study {e.name}", runs_url(port, e.experiment_id, prepare_experiment(client, e)))
             for e in exps]
    return Served(links, "(filter e.g. tags.status = 'diverged' and tags.`fix.bias_init` = 'on'; "
                         "Group by a fix.* tag; run pages open in MLflow 3's GenAI layout until "
                         "you pick 'Model training' at the top left)")


def serve(tracking_uri: str, port: int, study: Optional[str]) -> int:
    _check_exists(tracking_uri, "--tracking-uri",
                  "run a study first (python runner.py run studies/quick.yaml) or pass "
                  "--tracking-uri")
    return _serve("the MLflow UI", ui_command(tracking_uri, port), port, "/health",
                  lambda: study_links(tracking_uri, port, study))


# -------------------------------------------------------------------------- optuna-dashboard
def dashboard_links(storage: str, port: int, study: Optional[str]) -> Served:
    base = f"http://{HOST}:{port}/dashboard"
    try:
        import optuna

        store = optuna.storages.get_storage(storage)
        ids = {s.study_name: store.get_study_id_from_name(s.study_name)
               for s in store.get_all_studies()}
    except Exception:
        return Served([("optuna-dashboard", base)])
    if study:
        if study not in ids:
            return Served([("optuna-dashboard", base)],
                          f"(no study named {study!r} in {storage}; studies there: "
                          f"{', '.join(ids) or 'none'})")
        ids = {study: ids[study]}
    links = [(f"study {name}", f"{base}/studies/{sid}") for name, sid in ids.items()]
    return Served(links or [("optuna-dashboard", base)])


def serve_dashboard(storage: str, port: int, study: Optional[str]) -> int:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        raise UIError("optuna-dashboard is not installed: pip install optuna-dashboard "
                      "(or pip install -e '.[dev]')") from None
    _check_exists(storage, "--storage", "run a study first (python runner.py run "
                                        "studies/quick.yaml) or pass --storage")
    return _serve("optuna-dashboard", dashboard_command(storage, port), port, "/api/studies",
                  lambda: dashboard_links(storage, port, study))
