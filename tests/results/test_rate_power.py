"""Exact power of the rate tests (ablations/results/rate_power.py) against the analysis's own functions:
the numpy intervals equal statsmodels' and rates.py's outcome by outcome, the power agrees with
a Monte Carlo simulation of rates.rate_diff_paired / rate_diff_indep, and `plan` prints the
power of the test the analysis runs, over the pairs it will have."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import binom
from statsmodels.stats.proportion import proportion_confint

from ablations.design import designs
from ablations.results import power, rate_power, rates
from ablations.design.spec import parse_spec


# ------------------------------------------------------------------------------ intervals
@pytest.mark.parametrize("n, alpha", [(1, 0.05), (7, 0.05), (40, 0.05), (40, 0.01 / 12)])
def test_wilson_np_equals_statsmodels(n, alpha):
    x = np.arange(n + 1)
    lo, hi = rate_power.wilson_np(x, n, alpha)
    want = np.array([proportion_confint(int(k), n, alpha=alpha, method="wilson") for k in x])
    np.testing.assert_allclose(np.c_[lo, hi], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("alpha", [0.05, 0.005])
def test_paired_np_equals_newcombe_paired_at_every_outcome(alpha):
    """Every (both, on only, off only, neither) of 9 pairs: 220 outcomes, each phi branch."""
    n = 9
    out = [(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a)
           for c in range(n + 1 - a - b)]
    got = np.c_[rate_power.newcombe_paired_np(*np.array(out).T, alpha)]
    want = np.array([rates.newcombe_paired(*o, alpha) for o in out])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_indep_np_equals_newcombe_indep_at_every_outcome():
    x1, x0 = np.meshgrid(np.arange(7), np.arange(10), indexing="ij")
    got = np.c_[[v.ravel() for v in rate_power.newcombe_indep_np(x1, 6, x0, 9)]].T
    want = np.array([rates.newcombe_indep(int(a), 6, int(b), 9)
                     for a, b in zip(x1.ravel(), x0.ravel())])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ power
@pytest.mark.parametrize("n, p_on, p_off", [(96, 0.04, 0.0), (12, 0.5, 0.2), (60, 0.55, 0.35),
                                             (30, 0.1, 0.6), (300, 0.55, 0.45)])
def test_two_d_sum_equals_the_multinomial_enumeration(n, p_on, p_off):
    """The fast path (margins x hypergeometric 'both') against summing every outcome."""
    assert rate_power.paired_power(n, p_on, p_off) == pytest.approx(
        rate_power.paired_power_enumerated(n, p_on, p_off), abs=1e-9)


@functools.lru_cache(maxsize=None)
def _analysis_rejects(both: int, on_only: int, off_only: int, neither: int) -> bool:
    """The analysis's own decision on one outcome: rates.rate_diff_paired's p below 0.05 (its
    p is the dual of its interval, so the interval must exclude 0 as well)."""
    on = [1] * both + [1] * on_only + [0] * off_only + [0] * neither
    off = [1] * both + [0] * on_only + [1] * off_only + [0] * neither
    rd = rates.rate_diff_paired(on, off)
    assert (rd.p < 0.05) == (rd.low > 0 or rd.high < 0) or abs(rd.p - 0.05) < 1e-4
    return rd.p < 0.05


def _simulated_paired(n: int, p_on: float, p_off: float, rho: float, reps: int = 1500) -> float:
    """Share of `reps` simulated studies of n pairs where rates.rate_diff_paired rejects (each
    distinct outcome asked once: the function sees only the four counts)."""
    probs = rate_power.pair_probs(p_on, p_off, rho)
    counts = np.random.default_rng(20).multinomial(n, probs, size=reps)
    return float(np.mean([_analysis_rejects(*map(int, c)) for c in counts]))


@pytest.mark.parametrize("n, p_on, p_off, rho, expect", [
    (96, 0.04, 0.0, 0.0, (0.30, 0.40)),  # issue 20: the normal approximation said 80 %
    (96, 0.069, 0.0, 0.0, (0.75, 0.85)),  # issue 20: 80 % needs 6.9 %
    (14, 0.6, 0.2, 0.0, None),
    (16, 0.5, 0.2, 0.4, None),  # correlated pairs (the 3-d enumeration)
])
def test_exact_power_matches_a_simulation_of_the_analysis(n, p_on, p_off, rho, expect):
    exact = rate_power.paired_power(n, p_on, p_off, rho=rho)
    assert exact == pytest.approx(_simulated_paired(n, p_on, p_off, rho), abs=0.05)
    if expect:
        assert expect[0] < exact < expect[1]


def _power_by_hand(n: int, p_on: float, p_off: float, rho: float = 0.0) -> float:
    """rates.rate_diff_paired's decision on every outcome of n pairs, weighted by its
    multinomial probability: the analysis's power, with no sampling noise (slow: small n)."""
    from scipy.stats import multinomial

    probs = rate_power.pair_probs(p_on, p_off, rho)
    return sum(multinomial.pmf([a, b, c, n - a - b - c], n, probs)
               for a in range(n + 1) for b in range(n + 1 - a) for c in range(n + 1 - a - b)
               if _analysis_rejects(a, b, c, n - a - b - c))


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_power_is_the_analysis_decisions_summed_over_every_outcome(rho):
    """All 286 outcomes of 10 pairs."""
    assert rate_power.paired_power(10, 0.6, 0.25, rho=rho) == pytest.approx(
        _power_by_hand(10, 0.6, 0.25, rho), abs=1e-9)


def test_positive_correlation_adds_power():
    assert rate_power.paired_power(40, 0.5, 0.3, rho=0.4) > rate_power.paired_power(40, 0.5, 0.3) + 0.1


def test_unpaired_power_matches_a_simulation_of_rate_diff_indep():
    n, p_on, p_off, reps = 24, 0.4, 0.1, 1500
    rng = np.random.default_rng(3)
    x1, x0 = rng.binomial(n, p_on, reps), rng.binomial(n, p_off, reps)
    decide = functools.lru_cache(maxsize=None)(lambda a, b: rates.rate_diff_indep(a, n, b, n).p < 0.05)
    sim = np.mean([decide(int(a), int(b)) for a, b in zip(x1, x0)])
    assert rate_power.indep_power(n, n, p_on, p_off) == pytest.approx(sim, abs=0.05)


def test_detectable_rise_for_96_pairs_is_7_percent_not_4():
    """Issue 20's case: 80 % power needs 6.9 % (power 79.98 % there, so 7.0 % on the 0.1-point
    grid); the old Cohen's h line printed 4 %."""
    test = power.RateTest(True, 96, "")
    rise, half = power.detectable_rate(test)
    assert rise == pytest.approx(0.070)
    assert rate_power.paired_power(96, 0.069, 0) < 0.8 <= rate_power.paired_power(96, 0.070, 0)
    d = half  # around 50 %: power at the edge, not below it
    assert rate_power.paired_power(96, 0.5 + d / 2, 0.5 - d / 2) >= 0.8


def test_smallest_detectable_steps_past_a_dip():
    """Power that crosses 80 % at 0.5, dips to 70 % on (0.6, 0.62], then rises for good."""
    def power_at(d: float) -> float:
        return 0.7 if 0.6 < d <= 0.62 + 1e-12 else min(1.0, 0.3 + d)

    assert rate_power.smallest_detectable(power_at) == pytest.approx(0.621)
    assert math.isnan(rate_power.smallest_detectable(lambda d: 0.5))


# ------------------------------------------------------------------------------ the plan
STRESS = {"name": "s", "design": "one_at_a_time", "seeds": 2,
          "factors": {"bias_init": ["off", "on"], "layer_norm": ["off", "on"],
                      "clip_0_5": ["off", "on"]},
          "stress": {"lr": [1e-3, 1e-2, 0.1], "precision": ["fp32", "fp16"]}}


def _rise_by_hand(n: int) -> float:
    """0 % -> r with n pairs: the off arm has no event, so an outcome is b runs with the event,
    on only; the analysis rejects from the smallest such b on (asked of rates.rate_diff_paired),
    and the power is P(Binomial(n, r) >= b), solved for 80 %, rounded up to the 0.1-point grid."""
    b_min = next(b for b in range(n + 1) if _analysis_rejects(0, b, 0, n - b))
    r = brentq(lambda r: binom.sf(b_min - 1, n, r) - 0.8, 1e-9, 1 - 1e-9)
    return math.ceil(r * 1000 - 1e-9) / 1000


def test_plan_counts_the_pairs_of_each_contrast_per_regime():
    """One at a time, 2 seeds x lr ladder of 3, fp32/fp16 separate: add X to broken vs broken
    pairs 2 x 3 = 6 runs per regime; the printed rise is what rates.rate_diff_paired needs."""
    spec = parse_spec(STRESS)
    test = power.rate_test(spec)
    broken_fp32 = [r for r in designs.runs(spec) if "broken" in r.cell.roles
                   and r.config.precision == "fp32"]
    assert test.paired and test.n == len(broken_fp32) == 6
    line = next(ln for ln in power.plan(spec, "sqlite:////nonexistent/x.db") if "rate diff" in ln)
    assert "paired Newcombe score test" in line
    assert "6 pairs (2 seeds x 3 stress cells) per contrast per regime" in line
    assert f"0 % -> {100 * _rise_by_hand(6):.1f} %," in line
    d = float(line.split("or +-")[1].split(" %")[0]) / 100  # around 50 %: the crossing
    assert _power_by_hand(6, 0.5 + d / 2, 0.5 - d / 2) >= 0.8
    assert _power_by_hand(6, 0.5 + (d - 0.001) / 2, 0.5 - (d - 0.001) / 2) < 0.8


@pytest.mark.parametrize("design, factors, paired", [
    ("full_factorial", ["bias_init", "layer_norm", "clip_0_5"], True),
    ("fractional_factorial", ["bias_init", "layer_norm", "clip_0_5", "no_clamp"], False),
])
def test_rate_test_is_the_one_rates_rate_difference_runs(design, factors, paired):
    """The analysis's own pairing (rates.rate_difference) on the design's runs, per regime."""
    raw = {**STRESS, "design": design, "factors": {f: ["off", "on"] for f in factors}}
    if design == "fractional_factorial":
        raw["design"] = {"type": design, "runs": 8}
    spec = parse_spec(raw)
    test = power.rate_test(spec)
    runs = pd.DataFrame([{**r.cell.values(), "seed": r.seed, "diverged": i % 2}
                         for i, r in enumerate(designs.runs(spec))])
    fp32 = runs[runs.precision == "fp32"]
    rd = rates.rate_difference(fp32, "bias_init", "diverged",
                               [c for c in runs if c not in ("bias_init", "seed", "diverged")])
    assert (rd.paired, rd.n_on, rd.n_off) == (paired, test.n, test.n) and test.paired == paired
