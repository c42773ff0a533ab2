"""`runner.py ui` and `runner.py dashboard`: browse a study's results, on 127.0.0.1 only.

`ui` starts the MLflow UI with the fast settings measured here: one worker and job execution off
(about 10 s to the first answer instead of 21 s with MLflow's defaults on 2 cores). Before it
prints the addresses, it makes each study experiment open as a person wants to see it:

  * the experiment is marked as a model-training one (`mlflow.experimentKind`; new studies get
    it when created) and every printed address asks for the "Model training" layout
    (`workflowType=machine_learning`). MLflow 3.17 decides the layout per browser, not per
    experiment: a page without that parameter (a plain `/#/experiments/1`, or a run opened from
    the runs list) uses the layout the browser last picked, GenAI by default. Picking "Model
    training" at the top left once fixes that for the browser (on a run page it jumps to the
    runs list; Back returns to the run). The printed note says so;
  * the saved views of ablations/tracking/ui/views.py ("Study runs", "All attempts", "F1 by <factor>");
  * it prints, per study: the "Study runs" address, the latest report (report.md among the
    launch run's artifacts) and the chart view grouped by the first fix, then one per other
    factor: MLflow's group-by menu adds a key rather than switching to it, and picking a view
    from the Views menu drops the chart mode and the layout parameter, so each is a link.

`dashboard` starts optuna-dashboard on the study's Optuna storage.

Both servers run in their own process group (and, on Linux, die with this process even if it is
killed outright): Ctrl-C, SIGTERM or SIGHUP stop the server and every process it started. Server
output goes to a log file (printed) instead of the terminal; a port in use, a store that does not
exist or a server that does not come up is one line on stderr.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from typing import Callable, Optional

from ablations.tracking.ui import views
from ablations.tracking.ui.views import KIND_TAG, REPORT_PATH, TRAINING_KIND, artifact_url

HOST = "127.0.0.1"
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


def study_layout(client, experiment_id: str) -> Optional[views.StudyLayout]:
    """Factors and objective from the study's latest launch run, the longest child run name from
    its runs, the outcome prefixes and constant outcomes from its counted runs (views.from_store:
    constants once the launch's `runs_total` are counted); None before any launch."""
    from ablations.design.fixes import FIXES

    launch = views.latest_launch(client, experiment_id)
    if launch is None:
        return None
    params = launch.data.params
    # (a launch from before recipes logged no `fixes`: its fixes were the chorus CNN's)
    fixes = set(params["fixes"].split(",")) if "fixes" in params else set(FIXES)
    factors = [(f, f in fixes) for f in params.get("factors", "").split(",") if f]
    # (a launch from before `objective_metric` was logged has only "METRIC (direction)")
    objective = params.get("objective_metric") or (params.get("objective") or "").partition(" (")[0] or None
    names = [r.info.run_name or "" for r in client.search_runs(
        [experiment_id], "tags.kind = 'run'", max_results=1000)]
    total = params.get("runs_total", "")  # trials, for a search: each trains every seed
    seeds = len(json.loads(params["seeds"])) if params.get("design") == "search" else 1
    return views.from_store(views.StudyLayout(factors, objective, max(map(len, names), default=40)),
                            client, experiment_id, int(total) * seeds if total.isdigit() else None)


def prepare_experiment(client, experiment) -> Optional[views.StudyLayout]:
    """Mark a study experiment as model training and write its saved views (see views.py).

    Returns the study's layout, None when the views could not be written (no launch yet, or a
    read-only server): the URLs then go without a view."""
    try:
        if (experiment.tags or {}).get(KIND_TAG) != TRAINING_KIND:
            client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)
        layout = study_layout(client, experiment.experiment_id)
        if layout is not None:
            views.write_views(client, experiment, layout)
        return layout
    except Exception:  # noqa: BLE001 - browsing works without the views
        return None


def ui_url(port: int, route: str, **query: str) -> str:
    """A UI address that opens in MLflow 3's model-training layout (`workflowType`): without it
    a browser that never picked a layout gets the GenAI one (a "Traces 0" overview)."""
    q = {"workflowType": "machine_learning", **query}
    return f"http://{HOST}:{port}/#/{route}?" + urllib.parse.urlencode(q)


def runs_url(port: int, experiment_id: str, view_key: Optional[str], chart: bool = False) -> str:
    query = {"viewStateShareKey": view_key} if view_key else {}
    if chart:
        query["compareRunsMode"] = "CHART"
    return ui_url(port, f"experiments/{experiment_id}/runs", **query)


def _links(client, port: int, experiment) -> list[tuple[str, str]]:
    """The study's runs (counted runs), its latest report, and its chart view grouped by the
    first fix (or the first factor when no fix is one)."""
    eid = experiment.experiment_id
    layout = prepare_experiment(client, experiment)
    links = [(f"study {experiment.name}",
              runs_url(port, eid, views.RUNS_KEY if layout else None))]
    launch = views.latest_launch(client, eid, with_report=True)
    if launch is not None:
        links.append(("  report", f"http://{HOST}:{port}/"
                      + artifact_url(eid, launch.info.run_id, REPORT_PATH)))
    if layout and layout.factors:  # the first fix first, then every other factor with a view
        first = next((n for n, fix in layout.factors if fix), layout.factors[0][0])
        names = [first] + [n for n, _ in layout.factors[:views.MAX_FACTOR_VIEWS] if n != first]
        links += [(f"  charts, F1 by {name}", runs_url(port, eid, views.factor_key(name),
                                                        chart=True)) for name in names]
    return links


NOTE = ("(the study's runs list shows the counted runs; its Views menu, top right, also has "
        "'All attempts' (killed and failed ones, launches). A run page opened from the list "
        "shows MLflow 3's GenAI side bar until you pick 'Model training' at its top left once: "
        "the browser remembers it, and Back returns to the run)")


def study_links(tracking_uri: str, port: int, study: Optional[str]) -> Served:
    """The URLs of each study experiment (or of `study`'s), each prepared for browsing."""
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
    return Served([link for e in exps for link in _links(client, port, e)], NOTE)


def serve(tracking_uri: str, port: int, study: Optional[str]) -> int:
    _check_exists(tracking_uri, "--tracking-uri",
                  "run a study first (python runner.py run studies/quick.yaml) or pass "
                  "--tracking-uri")
    path = _sqlite_path(tracking_uri)
    if path is not None:  # a moved or copied study folder: its artifacts are found again
        from ablations.tracking.relocate import relocate

        try:
            for eid, old, new in relocate(path):
                print(f"experiment {eid}: artifacts re-pointed from {old} to {new} (the study "
                      f"folder was moved or copied)", flush=True)
        except Exception as e:  # noqa: BLE001 - browsing works without it (artifacts may not)
            print(f"warning: artifact locations not checked ({e})", file=sys.stderr, flush=True)
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
