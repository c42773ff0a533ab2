"""`runner.py ui` and `runner.py dashboard` as a person uses them: in a real browser.

A tiny 32-run study (input_norm x bias_init x a sane or an absurd learning rate, 4 seeds; half
of the runs diverge on purpose, and input_norm has a real effect on F1 at the sane rate) is run
with `runner.py run`, killed outright (SIGKILL) mid-run and resumed, so it carries a killed
attempt and a launch whose process died; `runner.py ui` serves it; headless Chromium (Debian's
`chromium`, driven by Playwright's Python package through `executable_path`: no browser
download) opens the URLs the command printed and checks what a user must see: the 32 counted
runs (not the killed attempt) with full names, seed first, at 1600 px; the status, objective,
fix and seed columns; grouped bar charts of F1 by a fix with two bars, of different heights
where the effect is real; the launch run's description with the verdicts and a working link to
the report; report.html in MLflow's HTML preview with every figure drawn and the effects right
under the verdicts; no relative link (`/context`) on a description; the curves sections before
the outcome bars in the chart view, and the outcomes that are the same in all 32 runs left out
of it with a line saying so; a run's description leading back to the study view, its cell's
seeds (opened) and the report; the runs filtered by `tags.status`; on a run's Model metrics tab
the train and val curve sections before the outcome bars (`outcome.*`, in MLflow's unprefixed
"Model metrics" section, last); one run's `train/loss` chart; optuna-dashboard's note that its importance is not the analysis. Ctrl-C stops
the UI with no process left behind. Screenshots go to the test's tmp dir (printed) and, if set,
to $CHORUS_SCREENSHOTS.

The tests that need the study are marked slow (run them with `pytest -m slow
tests/tracking/ui/test_ui_browser.py`, as `.ci/run` does); the one-line-error tests stay in the default run.
The browser tests skip, with the reason, where /usr/bin/chromium or the playwright package is
missing (a user's machine); `.ci/install_browser` installs Chromium for CI. The MLflow UI is a
React app that can take 10-30 s to first render on 2 busy cores: every wait is for an element,
with generous timeouts, never for a fixed time.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RUNNER = ROOT / "runner.py"
CHROMIUM = os.environ.get("CHORUS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-default-apps", "--disable-extensions"]
UI_TIMEOUT_MS = 120_000  # first render of the React app on 2 busy cores: 10-30 s seen

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a user's machine without the dev extra
    sync_playwright = None

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not os.access(CHROMIUM, os.X_OK),
    reason=("needs the playwright package (pip install -e '.[dev]')" if sync_playwright is None
            else f"needs Debian's Chromium at {CHROMIUM} (bash .ci/install_browser, as root)"))
# The study-backed tests share one tiny study and one UI server: 3.6 min for the four of them
# on a 2-core machine shared with other work, 7 min when it was busy (two `runner.py run`
# processes import torch/MLflow, the 32 runs train once, one more after the kill, the report is
# written; the UI takes ~10 s to answer). Hence slow: `.ci/run` runs them with
# `pytest -m slow tests/tracking/ui/test_ui_browser.py`.
slow = pytest.mark.slow
linux_only = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(),
                                reason="process checks read /proc")

DESCRIPTION = ("Browser-test study: input pre-normalisation x neutral classifier bias x a sane or "
               "an absurd learning rate.")
# SGD at lr 0.03: input_norm lifts final F1 from ~0.01 to ~0.5 (measured: a real effect);
# bias_init barely matters; lr 1e6 diverges every run.
STUDY = (f"description: \"{DESCRIPTION}\"\n"
         "factors: {input_norm: [off, on], bias_init: [off, on], lr: [3e-2, 1e6]}\nseeds: 4\n")
BASE = "epochs: 3, steps_per_epoch: 4, optimizer: sgd, grad_clip: null"  # over the tiny model
RUNS = 32


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_pids(port: int) -> list[int]:
    """Processes whose command line carries `--port PORT` (our servers and their workers)."""
    needle = f"\0--port\0{port}\0".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in b"\0" + (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on port, from /proc/net/tcp{,6}."""
    out = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                if len(addr) == 8:
                    out.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    out.add(addr)  # an IPv6 listener: reported raw, fails the test
    return out


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class Served:
    """`runner.py ui|dashboard ...` in the background, its stdout read line by line."""

    def __init__(self, cwd: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)

    def wait_for_line(self, prefix: str, timeout_s: float = 240) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line.strip()
        self.kill()
        pytest.fail(f"no line starting {prefix!r} (exit {self.proc.poll()}); stdout:\n"
                    f"{''.join(self.out)}\nstderr:\n{self.proc.stderr.read()}")

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C, as a terminal sends it to the command."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Shots:
    """Screenshots into the test's tmp dir and, if set, $CHORUS_SCREENSHOTS."""

    def __init__(self, tmp: Path):
        self.dirs = [tmp / "screenshots"]
        if os.environ.get("CHORUS_SCREENSHOTS"):
            self.dirs.append(Path(os.environ["CHORUS_SCREENSHOTS"]))
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    def __call__(self, page, name: str) -> None:
        first = self.dirs[0] / f"{name}.png"
        page.screenshot(path=str(first))
        for d in self.dirs[1:]:
            shutil.copy(first, d / first.name)
        self.taken.append(first)


def launch_browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_study):
    """A finished 32-run study with a killed attempt: the first launch is SIGKILLed while a run
    trains, the second resumes it. Its directory, stores and runs (read back from MLflow)."""
    d = tmp_path_factory.mktemp("ui")
    tiny_study(d, "tiny", STUDY, BASE)
    storage, tracking = f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db"
    cmd = [sys.executable, str(RUNNER), "run", "tiny.yaml", "--storage", storage,
           "--tracking-uri", tracking]
    env = {**os.environ, "CHORUS_HEARTBEAT_S": "1", "CHORUS_GRACE_S": "3"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    first = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:  # kill it outright while a run trains, after a few have finished
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first.poll() is None:
            exp = client.get_experiment_by_name("tiny") if (d / "mlflow.db").exists() else None
            runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'") if exp else []
            if sum(r.info.status == "FINISHED" for r in runs) >= 3 and any(
                    r.info.status == "RUNNING" for r in runs):
                first.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL, "the first launch was not caught mid-run"
    time.sleep(4)  # past CHORUS_GRACE_S: the killed run's heartbeat is stale
    p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return read_study(d)


def read_study(d: Path) -> dict:
    """The study of `study` as the tests use it, read back from its stores in d."""
    from mlflow.tracking import MlflowClient

    storage, tracking = f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("tiny")
    every = client.search_runs([exp.experiment_id], "", max_results=1000)
    runs = [r for r in every if r.data.tags.get("kind") == "run" and r.info.status == "FINISHED"]
    killed = [r for r in every if r.data.tags.get("kind") == "run" and r.info.status == "KILLED"]
    launches = [r for r in every if r.data.tags.get("kind") == "launch"]
    assert len(runs) == RUNS and killed, [(r.info.run_name, r.info.status) for r in every]
    # the dead launch was closed when the study was resumed, not left RUNNING forever
    assert sorted(r.info.status for r in launches) == ["FINISHED", "KILLED"]
    with_report = next(r for r in launches if r.info.status == "FINISHED").info.run_id
    for r in runs:  # the killed launch's runs too: log_report re-pointed their link
        assert f"/runs/{with_report}/artifacts/report/report.html" in r.data.tags[
            "mlflow.note.content"], (r.info.run_name, r.data.tags["mlflow.parentRunId"])
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} != {with_report}  # both launches
    statuses = {r.data.tags["status"] for r in runs}
    assert "diverged" in statuses and statuses - {"diverged"}, statuses  # the filter must bite
    return {"dir": d, "storage": storage, "tracking": tracking, "client": client,
            "experiment_id": exp.experiment_id, "runs": runs, "killed": killed,
            "launch": next(r for r in launches if r.info.status == "FINISHED")}


@pytest.fixture(scope="module")
def ui(study):
    """`runner.py ui` on a free port; the tests below stop it with Ctrl-C themselves."""
    port = free_port()
    served = Served(study["dir"], "ui", "--tracking-uri", study["tracking"], "--port", str(port),
                    "--study", "tiny")
    line = served.wait_for_line("study tiny: ")
    url = line.split(": ", 1)[1]
    served.wait_for_line("Ctrl-C to stop")
    links = dict(l.strip().split(": ", 1) for l in served.out if ": http://" in l)
    yield {"served": served, "port": port, "url": url, "links": links}
    served.kill()


# -------------------------------------------------------------------------------- tests
@slow
def test_ui_prints_the_study_report_and_chart_urls(study, ui):
    url, links = ui["url"], ui["links"]
    base = f"http://127.0.0.1:{ui['port']}/#/experiments/{study['experiment_id']}"
    assert url.startswith(f"{base}/runs?")
    assert "viewStateShareKey=chorus-study-runs" in url
    launch = study["launch"].info.run_id
    assert links["report"] == (f"{base}/runs/{launch}/artifacts/report/report.html"
                               f"?workflowType=machine_learning")
    charts = [k for k in links if k.startswith("charts, F1 by ")]
    assert charts[0] == "charts, F1 by input_norm"  # the first fix first
    assert set(charts) == {f"charts, F1 by {f}" for f in ("input_norm", "bias_init", "lr")}
    assert "compareRunsMode=CHART" in links["charts, F1 by input_norm"]
    for u in links.values():  # every address opens the model-training layout
        assert "workflowType=machine_learning" in u, u
    if Path("/proc/net/tcp").exists():  # listening on loopback only
        assert listening_addresses(ui["port"]) == {"127.0.0.1"}


@needs_browser
@slow
def test_ui_in_a_browser_runs_tags_chart_filter(study, ui, tmp_path):
    assert ui["served"].proc.poll() is None, "runner.py ui must still be serving"
    runs = study["runs"]
    launch = study["launch"].info.run_id  # a run of the resumed launch first: its parent has
    diverged = sorted((r for r in runs if r.data.tags["status"] == "diverged"),  # the report
                      key=lambda r: r.data.tags["mlflow.parentRunId"] != launch)
    others = [r for r in runs if r.data.tags["status"] != "diverged"]
    shots = Shots(tmp_path)
    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        try:
            _runs_table(page, ui["url"], runs, study["killed"], shots)
            _f1_bars(page, ui["links"]["charts, F1 by input_norm"], "input_norm", shots,
                     "2-charts-f1-by-input_norm", real=True)
            _f1_bars(page, ui["links"]["charts, F1 by bias_init"], "bias_init", shots,
                     "3-charts-f1-by-bias_init", real=False)
            _launch_description(page, study, ui["url"], shots)
            page.goto(ui["url"])
            opened = _filter_by_status(page, diverged, others, shots)
            _run_page_chart(page, study, opened, shots)
            _parent_report(page, study, shots)
            _curves_before_outcomes(page, study, others[0], shots)
        except BaseException:
            shots(page, "failure")
            raise
        finally:
            browser.close()
            print(f"\nscreenshots: {shots.dirs[0]}")
    assert len(shots.taken) == 12


# The run name's text is whole: no element between it and its table cell cuts it (ellipsis)
# and it ends inside the cell.
FITS = """e => {
    const cell = e.closest('.ag-cell');
    for (let n = e; n && n !== cell.parentElement; n = n.parentElement)
        if (n.clientWidth && n.scrollWidth > n.clientWidth + 1) return false;
    return e.getBoundingClientRect().right <= cell.getBoundingClientRect().right + 1;
}"""


def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")  # MLflow 3's assistant panel
    if page.get_by_text("MLflow Assistant").count() and close.count():
        close.first.click()


def _runs_table(page, url: str, runs, killed, shots) -> None:
    """The printed URL: the counted runs only (not the killed attempt), full names with the seed
    first at 1600 px, status and the rounded objective before the factors, a seed column."""
    page.set_viewport_size({"width": 1600, "height": 1500})  # all 32 rows drawn at once
    page.goto(url)
    expect(page.get_by_text("matching runs")).to_be_visible()
    _close_assistant(page)
    expect(page.get_by_text(DESCRIPTION)).to_be_visible()  # the study description
    report = page.get_by_role("link", name="Report", exact=True)  # on its first line, unclipped
    expect(report).to_be_visible()
    expect(report).to_have_attribute("href", re.compile(r"/artifacts/report/report\.html\?"))
    expect(page.get_by_text("Error loading shared view state")).to_have_count(0)
    expect(page.get_by_role("button", name="Study runs")).to_be_visible()  # the saved view
    expect(page.get_by_text(f"{RUNS} matching runs")).to_be_visible()  # killed attempt left out
    for r in killed:
        expect(page.locator(f'.ag-row[row-id="{r.info.run_id}"]')).to_have_count(0)
    for r in runs:  # every counted run, by its full name, with its fix tag, status and seed
        name = r.info.run_name
        assert name.startswith(f"s{r.data.tags['seed']} "), name
        row = page.locator(f'.ag-row[row-id="{r.info.run_id}"]')
        cell = row.get_by_text(name, exact=True)
        expect(cell).to_be_visible()
        assert cell.evaluate(FITS), f"{name} is cut"
        assert cell.bounding_box()["x"] + cell.bounding_box()["width"] < 1600
        expect(row.locator('[col-id="tags.`fix.bias_init`"]')).to_have_text(
            r.data.tags["fix.bias_init"])
        expect(row.locator('[col-id="tags.`status`"]')).to_have_text(r.data.tags["status"])
        expect(row.locator('[col-id="tags.`seed`"]')).to_have_text(r.data.tags["seed"])
        f1 = row.locator('[col-id="metrics.`final_val_f1`"]')
        expect(f1).to_have_text(re.compile(r"^(0|1|0\.0*[1-9]\d{0,2})$"))  # 3 digits, not 16
    def x(col: str) -> float:  # on screen, left to right (the DOM order differs)
        return page.locator(f'.ag-header-cell[col-id="{col}"]').bounding_box()["x"]

    order = ["tags.`status`", "metrics.`final_val_f1`", "tags.`fix.input_norm`",
             "tags.`fix.bias_init`", "params.`lr`", "tags.`seed`"]
    assert [x(c) for c in order] == sorted(x(c) for c in order), order
    shots(page, "1-study-runs")
    page.set_viewport_size({"width": 1600, "height": 1000})


def _f1_bars(page, url: str, fix: str, shots, name: str, real: bool) -> None:
    """A printed chart URL: the runs grouped by the fix, a bar chart of mean F1 with one bar per
    group (off, on) and a divergence-rate chart; with a real effect the bars differ."""
    page.goto(url)
    expect(page.get_by_text(f"{RUNS} matching runs")).to_be_visible()
    _close_assistant(page)
    expect(page.get_by_role("button", name=f"Group by: fix.{fix}")).to_be_visible()
    expect(page.get_by_text(f"final F1 and divergence rate by {fix}")).to_be_visible()
    card = page.locator(".js-plotly-plot").first  # the first card: final_val_f1
    bars = card.locator("g.point path")
    expect(bars).to_have_count(2)
    widths = [bars.nth(i).bounding_box()["width"] for i in range(2)]
    assert min(widths) > 0, widths
    if real:  # input_norm: mean F1 ~0.25 on vs ~0.01 off at the sane lr (half the runs diverge)
        assert max(widths) > 2 * min(widths), widths
    rate = page.locator(".js-plotly-plot").nth(1).locator("g.point path")  # the second card
    expect(rate).to_have_count(2)  # divergence rate per group: lr 1e6 diverges in each group
    assert all(rate.nth(i).bounding_box()["width"] > 0 for i in range(2))
    # what is the same in all 32 runs is not drawn, and a line under the bars says so: fp32
    # runs have no scaler skips; half of the runs diverged, so the divergence rate is drawn
    note = page.get_by_text(re.compile(rf"^not drawn, the same in all {RUNS} runs: "))
    expect(note).to_be_visible()
    assert "scaler_skips 0" in note.inner_text() and "diverged" not in note.inner_text()
    # the curves come right after the headline bars; the outcome.* bars last (Model metrics)
    assert card.bounding_box()["y"] < _y(page, "train") < _y(page, "val") < _y(
        page, "Model metrics")
    shots(page, name)


def _y(page, text: str) -> float:
    """Where a section's header is, from the top: the lowest visible element with exactly that
    text (a run page's "Model metrics" tab carries its section's name too)."""
    found = page.get_by_text(text, exact=True)
    expect(found.first).to_be_visible()
    boxes = [found.nth(i).bounding_box() for i in range(found.count())]
    return max(b["y"] for b in boxes if b)


def _launch_description(page, study, url: str, shots) -> None:
    """The launch run's overview: its description opens with the verdicts and a link to the
    report, which opens report.md (in a new tab, as MLflow opens description links)."""
    launch = study["launch"]
    page.goto(url.split("/runs?")[0] + f"/runs/{launch.info.run_id}?workflowType=machine_learning")
    expect(page.get_by_role("heading", name=launch.info.run_name)).to_be_visible()
    _close_assistant(page)
    verdicts = page.get_by_text(re.compile(r"^Verdicts \(32 counted runs\): \w+ \w+, \w+ \w+\.$"))
    expect(verdicts.first).to_be_visible()
    text = verdicts.first.inner_text()
    assert re.search(r"input_norm (supported|refuted|inconclusive)", text), text
    assert re.search(r"bias_init (supported|refuted|inconclusive)", text), text
    expect(page.get_by_text("[95% CI").first).to_be_visible()  # the verdicts' CIs, as text
    _no_relative_links(page)  # ... not links to /context (showdown read `[CI] (context)` as one)
    link = page.get_by_role("link", name="report/report.html").first
    expect(link).to_be_visible()
    shots(page, "4-launch-run-verdicts")
    with page.context.expect_page() as opened:
        link.click()
    report = opened.value
    _html_report_with_figures(report, study)
    shots(report, "5-report-from-the-description")
    report.close()


def _no_relative_links(page) -> None:
    """Every link on the page goes to a UI route (#/...) or a full address: a description's
    Markdown gone wrong makes relative ones (`context` -> /context, "Not Found")."""
    hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.getAttribute('href'))")
    assert hrefs, "no links at all: the page did not render"
    bad = [h for h in hrefs if not h.startswith(("#/", "http://", "https://"))]
    assert not bad, bad


def _html_report_with_figures(page, study) -> None:
    """report.html in MLflow's HTML preview (a sandboxed iframe): its title, the effects figure
    right under the verdicts, and every figure of the report folder drawn (data: URIs)."""
    expect(page.get_by_text("report/report.html", exact=True).first).to_be_visible(
        timeout=UI_TIMEOUT_MS)  # the preview's title
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    expect(frame.get_by_role("heading", name="Ablation report: tiny")).to_be_visible(
        timeout=UI_TIMEOUT_MS)
    pngs = sorted(a.path.rsplit("/", 1)[1] for a in study["client"].list_artifacts(
        study["launch"].info.run_id, "report") if a.path.endswith(".png"))
    assert len(pngs) >= 3, pngs
    images = frame.locator("img")
    expect(images).to_have_count(len(pngs))
    sizes = images.evaluate_all("is => is.map(i => [i.alt, i.complete, i.naturalWidth])")
    assert all(done and width > 200 for _, done, width in sizes), sizes
    assert sorted(f"{alt}.png" for alt, _, _ in sizes) == pngs  # each figure, once
    # the effects with their intervals come right after the verdicts, before the method text
    order = frame.locator("h2, h3, figure").evaluate_all(
        "es => es.map(e => e.id || e.textContent)")
    assert order.index("fig-effects") == order.index("verdicts-on-the-seed-s-claims") + 2, order
    assert order.index("fig-effects") < order.index("how-effects-are-estimated"), order


def _filter_by_status(page, diverged, others, shots):
    box = page.get_by_test_id("search-box")
    box.fill("tags.status = 'diverged'")
    box.press("Enter")
    for r in others:
        expect(page.get_by_text(r.info.run_name, exact=True)).to_have_count(0)
    for r in diverged:
        expect(page.get_by_text(r.info.run_name, exact=True)).to_be_visible()
    expect(page.get_by_text(f"{len(diverged)} matching runs")).to_be_visible()
    shots(page, "6-filtered-diverged")
    return diverged[0]


def _run_page_chart(page, study, run, shots) -> None:
    history = study["client"].get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 2, "a diverged run keeps its finite train/loss steps"
    page.get_by_text(run.info.run_name, exact=True).click()  # open the run, as a person does
    expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()
    expect(page.get_by_text("fix.bias_init").first).to_be_visible()  # its tags, on the overview
    expect(page.get_by_text(re.compile(r"diverged after \d+ steps")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"First non-finite value at step \d+")).first
           ).to_be_visible()  # its description says what happened
    _links_back(page, study, run, shots)
    shots(page, "7-run-overview")
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("train/loss")
    chart = page.locator(".js-plotly-plot").filter(has_text="Step").first
    expect(chart).to_be_visible()
    expect(page.get_by_text(f"{run.info.run_name} (train/loss)")).to_be_visible()  # legend
    line = chart.locator("path.js-line").first
    expect(line).to_have_attribute("d", re.compile(r"^M[\d.,e+-]+(L[\d.,e+-]+)+"))
    shots(page, "8-run-train-loss-chart")


def _curves_before_outcomes(page, study, run, shots) -> None:
    """A run's Model metrics tab (a run that did not diverge, so it has val curves): MLflow sorts
    its sections by prefix and puts the unprefixed "Model metrics" last; the outcomes are
    `outcome.*` (names.OUTCOME_PREFIX), so they come after the train and val curves, with no
    `outcome` section before them."""
    page.goto(f"{_base(page)}/#/experiments/{study['experiment_id']}/runs/{run.info.run_id}"
              f"/model-metrics?workflowType=machine_learning")
    expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()
    _close_assistant(page)
    expect(page.get_by_text("val", exact=True).first).to_be_visible()
    assert _y(page, "train") < _y(page, "val") < _y(page, "Model metrics")
    expect(page.get_by_text("outcome", exact=True)).to_have_count(0)
    section = page.get_by_text("Model metrics", exact=True).last
    section.scroll_into_view_if_needed()
    expect(page.get_by_text("outcome.epochs", exact=True).first).to_be_visible()  # its bars
    assert _y(page, "outcome.epochs") > _y(page, "Model metrics")
    shots(page, "8a-run-curves-before-outcomes")


def _base(page) -> str:
    return page.url.split("/#/")[0]


def _links_back(page, study, run, shots) -> None:
    """A run's description leads back: to the study's "Study runs" view, to its cell's seeds
    (opened here: exactly the counted runs of its cell) and to the report."""
    _no_relative_links(page)
    eid = study["experiment_id"]
    study_link = page.get_by_role("link", name="study runs", exact=True)
    expect(study_link).to_have_attribute("href", re.compile(
        rf"^#/experiments/{eid}/runs\?.*viewStateShareKey=chorus-study-runs"))
    launch = study["launch"].info.run_id  # a run of the earlier, killed launch would link here too
    expect(page.get_by_role("link", name="report", exact=True)).to_have_attribute(
        "href", re.compile(rf"^#/experiments/{eid}/runs/{launch}/artifacts/report/report\.html"))
    seeds = [r for r in study["runs"] if r.data.tags["cell_id"] == run.data.tags["cell_id"]]
    with page.context.expect_page() as opened:  # description links open a new tab
        page.get_by_role("link", name="this cell's seeds", exact=True).click()
    siblings = opened.value
    expect(siblings.get_by_text(f"{len(seeds)} matching runs")).to_be_visible(
        timeout=UI_TIMEOUT_MS)
    for r in seeds:
        expect(siblings.locator(f'.ag-row[row-id="{r.info.run_id}"]').first).to_be_visible()
    shots(siblings, "7b-cell-seeds")
    siblings.close()


def _parent_report(page, study, shots) -> None:
    """From the run's overview to its launch (parent) run: the report and its figures."""
    launch = study["launch"]
    page.get_by_role("tab", name="Overview").click()
    page.get_by_role("link", name=launch.info.run_name).click()  # "Parent run" on the overview
    expect(page.get_by_role("heading", name=launch.info.run_name)).to_be_visible()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("report.html", exact=True).click()
    _html_report_with_figures(page, study)
    shots(page, "9-launch-run-report")
    figures = [a.path.rsplit("/", 1)[1] for a in study["client"].list_artifacts(
        launch.info.run_id, "report") if a.path.endswith(".png")]
    assert figures, "the report's figures are on the launch run"
    figure = "effects.png" if "effects.png" in figures else figures[0]
    page.get_by_text(figure, exact=True).click()
    expect(page.get_by_text(f"report/{figure}", exact=True)).to_be_visible()  # preview title
    page.wait_for_function(  # the figure itself, loaded and drawn large
        "() => [...document.images].some(i => i.complete && i.naturalWidth > 200 && "
        "i.getBoundingClientRect().width > 200)", timeout=UI_TIMEOUT_MS)
    shots(page, "10-launch-run-figure")


@slow
@linux_only
def test_ui_ctrl_c_leaves_no_process_behind(ui):
    port, served = ui["port"], ui["served"]
    assert served.proc.poll() is None, "runner.py ui is still serving (this test stops it)"
    assert server_pids(port), "the MLflow UI server and its worker are running"
    assert served.interrupt() == 0
    assert "stopping the MLflow UI" in "".join(served.out)
    deadline = time.monotonic() + 30
    while server_pids(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server_pids(port) == []
    assert not port_answers(port)


def test_ui_port_in_use_is_one_line_error(tmp_path):
    (tmp_path / "mlflow.db").touch()  # the port is checked before the store is opened
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, str(RUNNER), "ui", "--port", str(port)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: port {port} on 127.0.0.1 is in use")
    assert "Traceback" not in p.stderr


def test_ui_without_a_store_is_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, str(RUNNER), "ui", "--port", str(free_port())],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "no such database" in lines[0] and "runner.py run" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # and no empty store left behind


@slow
def test_dashboard_serves_the_optuna_study(study, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed (dev extra)")
    import json
    import urllib.request

    port = free_port()
    served = Served(study["dir"], "dashboard", "--storage", study["storage"], "--port",
                    str(port), "--study", "tiny")
    try:
        url = served.wait_for_line("study tiny: ").split(": ", 1)[1]
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/dashboard/studies/\d+", url), url
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as r:
            names = [s["study_name"] for s in json.load(r)["study_summaries"]]
        assert names == ["tiny"]
        if sync_playwright is not None and os.access(CHROMIUM, os.X_OK):
            shots = Shots(tmp_path)
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(url)
                expect(page.get_by_text("tiny").first).to_be_visible(timeout=UI_TIMEOUT_MS)
                expect(page.locator(".js-plotly-plot").first).to_be_visible(
                    timeout=UI_TIMEOUT_MS)
                shots(page, "11-optuna-dashboard")
                # a factorial study: its importance chart is not the analysis, and says so on
                # the study's Note page (optuna-dashboard shows study notes there only)
                page.get_by_role("link", name="Note").click()
                expect(page.get_by_text("Not the analysis.")).to_be_visible(timeout=UI_TIMEOUT_MS)
                shots(page, "12-optuna-dashboard-note")
                browser.close()
        assert served.interrupt() == 0
        if Path("/proc/self/cmdline").exists():
            assert server_pids(port) == []
    finally:
        served.kill()
