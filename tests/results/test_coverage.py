"""The report's intervals keep their stated coverage at the seed counts users run: planted truths,
simulated, analysed by the report's own functions. The fast cases of benchmarks/coverage.py
(which prints the long version); every simulation has a fixed seed, so these are exact checks
of what the code computes, not flaky ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "coverage_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "coverage.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)


@pytest.mark.parametrize("seeds", [3, 6])
def test_paired_t_interval_covers_95_percent_at_3_and_6_seeds(seeds):
    c = cov.paired_coverage(seeds, 2000, "normal", "t", seed=seeds)
    assert 0.93 <= c <= 0.97


def test_the_bootstrap_it_replaced_did_not():
    assert cov.paired_coverage(3, 300, "normal", "bca", seed=1) < 0.85


@pytest.mark.parametrize("seeds, sigma, delta", [(3, 0.7, 1.0), (5, 0.7, 0.0)])
def test_lr50_shift_interval_covers_the_planted_shift(seeds, sigma, delta):
    r = cov.shift_trials(seeds, sigma, delta, 200, seed=11)
    assert r["coverage"] >= 0.93


def test_lr50_shift_detects_a_decade_with_five_seeds_that_agree():
    assert cov.shift_trials(5, 0.3, 1.0, 100, seed=3)["reject"] >= 0.8


def test_a_censored_edge_is_never_printed_as_a_number():
    met, numbers = cov.censored_never_a_number(200, seed=2)
    assert met > 50 and numbers == 0


def test_opposite_backgrounds_are_detected_and_not_invented():
    assert cov.opposite_rate({"broken": 0.8, "add:x": 0.1, "drop:x": 0.1, "fixed": 0.8}, 40) >= 0.8
    assert cov.opposite_rate({r: 0.4 for r in ("broken", "add:x", "drop:x", "fixed")}, 40) <= 0.05


def test_a_dropped_run_is_never_counted_as_stable():
    assert cov.missing_never_stable(30, seed=4) == 0
