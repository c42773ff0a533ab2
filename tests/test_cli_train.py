"""`python runner.py train --set ...` as a subprocess: exit codes, output, one-line errors."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = ["n_songs=6", "frames=64", "n_features=16", "hidden_dim=8", "n_blocks=1",
             "epochs=2", "steps_per_epoch=5", "batch_size=4", "device=cpu"]
BAD_SETS = {"lr=abc": "lr", "nosuchkey=1": "nosuchkey", "norm=group": "norm", "lr": "lr"}
# The README's one-run symptom command, verbatim (it must print the seed's symptom)
SYMPTOM = ["--baseline", "broken", "features=power", "precision=fp16", "nonfinite=stop", "epochs=1",
           "steps_per_epoch=5"]
TRANSFORMER = ["--recipe", "chorus_transformer", "n_songs=6", "frames=32", "n_features=16",
               "d_model=16", "n_heads=2", "n_layers=1", "epochs=1", "steps_per_epoch=5",
               "batch_size=4", "device=cpu"]
RUNS = {"tiny": TINY_SETS, "high_lr": TINY_SETS + ["lr=2e-3"], "symptom": SYMPTOM,
        "transformer": TRANSFORMER, "old_recipe_flag": ["--recipe", "broken"] + TINY_SETS,
        **{b: [b] for b in BAD_SETS}}
if not torch.cuda.is_available():
    RUNS["cuda"] = TINY_SETS + ["device=cuda"]


def run_train(sets: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "runner.py", "train"]
    for s in sets:
        args += [s] if s.startswith("--") or args[-1] in ("--baseline", "--recipe") else ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only add contention
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cli():
    """Every `runner.py train` run of this module, one per core at a time (each mostly imports torch)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(RUNS, pool.map(run_train, RUNS.values())))


def test_train_tiny_config_exits_0_and_prints_status(cli):
    """A tiny run exits 0, prints one line per epoch and a final 'status' line."""
    proc = cli["tiny"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("status converged"), proc.stdout
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert "10 steps" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert "warning" not in proc.stderr


def test_train_a_shipped_recipe_by_name(cli):
    """`--recipe chorus_transformer`: its own config fields, and its curve (the largest attention
    logit) summarised on the status line."""
    proc = cli["transformer"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("training chorus_transformer: {")
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("status ") and "5 steps" in last and " peak_attn_logit " in last


def test_old_recipe_flag_still_means_the_baseline(cli):
    """`--recipe broken` (before recipes were model families) still trains the broken recipe,
    with a one-line note."""
    proc = cli["old_recipe_flag"]
    assert proc.returncode == 0, proc.stderr
    assert "note: --recipe broken now reads --baseline broken" in proc.stderr
    assert "'norm': 'batch'" in proc.stdout.splitlines()[0]


def test_readme_symptom_command_prints_the_seed_symptom(cli):
    """The broken recipe on mel power features under fp16: `loss=nan, grad_norm=nan,
    chorus%=0.00` at step 1, as the seed's authors saw it."""
    proc = cli["symptom"]
    assert proc.returncode == 0, proc.stderr
    assert "last step 1: loss=nan, grad_norm=nan, chorus%=0.00" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("status diverged")
    assert "stem.conv:forward" in proc.stdout


@pytest.mark.parametrize("arg, key", BAD_SETS.items())
def test_bad_set_exits_2_with_one_line_error(cli, arg, key):
    """A bad --set exits 2 with a single 'error:' line on stderr naming the key, no traceback."""
    proc = cli[arg]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and key in err[0], err[0]
    assert "Traceback" not in proc.stderr
    assert "status" not in proc.stdout
    if key == "nosuchkey":  # the unknown-key error lists the allowed settings
        assert "allowed:" in err[0] and "grad_clip" in err[0]


def test_high_lr_prints_warning_line_and_still_trains(cli):
    """--set lr=2e-3 prints a 'warning:' line on stderr and the run still completes."""
    proc = cli["high_lr"]
    assert proc.returncode == 0, proc.stderr
    warn = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "lr=0.002" in warn[0], proc.stderr
    assert "status" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_bad_input(cli):
    """--set device=cuda on a CPU-only machine is a user error: exit 2, one line, no traceback."""
    proc = cli["cuda"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
