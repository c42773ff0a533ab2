"""`runner.py run` and `runner.py status` as a user runs them (subprocesses, real stores).

The happy path (run a tiny 8-run study, status, run again) is marked slow: a fresh process
imports torch/MLflow/Optuna, migrates a new MLflow database and trains with torch's default
threads, 20-35 s on a busy 2-core machine. The error paths stop before training and stay in
the default set."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "runner.py"

FACTORS = "factors: {plain_residual: [off, on], lr: [1e-4, 3e-3]}\n"  # (tiny study: 2 seeds)


def runner(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_study):
    d = tmp_path_factory.mktemp("cli")
    tiny_study(d, "tiny", FACTORS)
    storage, tracking = f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db"
    first = runner(d, "run", "tiny.yaml", "--storage", storage, "--tracking-uri", tracking)
    return d, storage, tracking, first


@pytest.mark.slow  # the shared `ran` fixture: 20-35 s on a busy 2-core machine
def test_cli_run_trains_the_study_and_prints_the_summary(ran):
    d, _, tracking, p = ran
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "study tiny: full_factorial, 2 factors, 8 runs (0 done" in out
    assert len([l for l in out.splitlines() if l.startswith("[")]) == 8
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("cell "))
    assert "runs" in lines[header] and "converged/recovered/collapsed/diverged" in lines[header]
    assert "final_val_f1 mean ± sd" in lines[header]
    rows = lines[header + 1:header + 5]
    cells = {f"plain_residual={a} lr={b}" for a in ("off", "on") for b in ("0.0001", "0.003")}
    assert {r.split("  ")[0].strip() for r in rows} == cells
    assert all(r.split()[2] == "2" for r in rows)  # runs column
    assert "(a diverged run's final_val_f1 counts as 0)" in out
    assert "8/8 runs done" in out and f"--tracking-uri {tracking}" in out
    assert (d / "mlruns").is_dir()  # artifacts under the working directory


@pytest.mark.slow  # the shared `ran` fixture: 20-35 s on a busy 2-core machine
def test_cli_status_reports_all_done(ran):
    d, storage, _, _ = ran
    p = runner(d, "status", "tiny.yaml", "--storage", storage)
    assert p.returncode == 0, p.stderr
    assert "study tiny: 8/8 done, 0 running, 0 queued, 0 failed (given up)" in p.stdout


@pytest.mark.slow  # the shared `ran` fixture: 20-35 s on a busy 2-core machine
def test_cli_run_again_trains_nothing(ran):
    d, storage, tracking, _ = ran
    p = runner(d, "run", "tiny.yaml", "--storage", storage, "--tracking-uri", tracking)
    assert p.returncode == 0, p.stderr
    assert "(8 done," in p.stdout and "8/8 runs done" in p.stdout
    assert not [l for l in p.stdout.splitlines() if l.startswith("[")]


def test_cli_status_of_a_study_not_in_the_storage(tmp_path, tiny_study):
    tiny_study(tmp_path, "tiny", FACTORS)
    p = runner(tmp_path, "status", "tiny.yaml", "--storage", f"sqlite:///{tmp_path}/empty.db")
    line = one_line_error(p)
    assert "study 'tiny' not found" in line and "empty.db" in line


def test_cli_status_with_a_storage_that_cannot_be_opened(tmp_path, tiny_study):
    tiny_study(tmp_path, "tiny", FACTORS)
    p = runner(tmp_path, "status", "tiny.yaml", "--storage",
               f"sqlite:///{tmp_path}/no_such_dir/optuna.db")
    line = one_line_error(p)
    assert "no_such_dir" in line


def test_cli_bad_workers_and_bad_storage_scheme(tmp_path, tiny_study):
    tiny_study(tmp_path, "tiny", FACTORS)
    line = one_line_error(runner(tmp_path, "run", "tiny.yaml", "--workers", "-1"))
    assert "--workers -1: must be >= 0" in line
    line = one_line_error(runner(tmp_path, "status", "tiny.yaml", "--storage", "redis://x"))
    assert "--storage 'redis://x'" in line


def test_cli_unreachable_tracking_server_fails_fast(tmp_path, tiny_study):
    """Nothing listens on port 9: the run must stop with a one-line error before any training,
    within about a minute (not after MLflow's minutes of HTTP retries)."""
    tiny_study(tmp_path, "tiny", FACTORS)
    t0 = time.monotonic()
    try:
        p = runner(tmp_path, "run", "tiny.yaml", "--storage", f"sqlite:///{tmp_path}/optuna.db",
                   "--tracking-uri", "http://127.0.0.1:9", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"runner.py run --tracking-uri http://127.0.0.1:9 still running after "
                    f"{time.monotonic() - t0:.0f} s")
    line = one_line_error(p)
    assert "--tracking-uri http://127.0.0.1:9" in line and "cannot reach" in line
    assert not (tmp_path / "optuna.db").exists()  # failed before the study was even created
    assert "[1/8]" not in p.stdout


def test_cli_prints_the_plan_size_first_and_refuses_a_huge_design_without_yes(tmp_path, tiny_study):
    """A 20 002-run design (a seed count with a stray digit) stops before any store is made,
    after saying how big it is; --yes lets it through (to the next check here: no tracking
    server on port 9)."""
    tiny_study(tmp_path, "huge", "factors: {plain_residual: [off, on]}\nseeds: 10001\n")
    args = ("run", "huge.yaml", "--storage", f"sqlite:///{tmp_path}/optuna.db",
            "--tracking-uri", "http://127.0.0.1:9")
    p = runner(tmp_path, *args)
    line = one_line_error(p)
    assert p.stdout.splitlines() == ["plan: 2 cells x 10001 seeds = 20002 runs"]
    assert "20002 runs is over 20000" in line and "--yes" in line
    assert not (tmp_path / "optuna.db").exists()
    p = runner(tmp_path, *args, "--yes", timeout=120)
    assert "cannot reach" in one_line_error(p)


def test_cli_plan_size_of_a_search_design(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\ndesign: search\nfactors: {lr: {low: 1e-4, high: "
                                     "1e-2}}\nseeds: 3\nbudget: {trials: 5}\n")
    p = runner(tmp_path, "run", "s.yaml", "--workers", "0", "--storage",
               f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", "http://127.0.0.1:9")
    assert p.stdout.splitlines()[0] == "plan: 5 trials x 3 seeds = 15 runs"
    assert "cannot reach" in one_line_error(p)
