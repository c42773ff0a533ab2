"""Exact power of the rate tests the analysis runs (ablations/results/rates.py), for `runner.py plan`.

A test *rejects* when its 95 % interval excludes 0 (rates.ci_pvalue makes "p < alpha" the same
statement). Power is the probability of that, summed exactly over every outcome of the design:

  * paired (rates.newcombe_paired: one-at-a-time and full factorial designs): n pairs, each
    (both, on only, off only, neither) with probabilities p11, p10, p01, p00, so the counts are
    multinomial. The two runs of a pair are independent given the arms' rates (rho = 0) unless a
    correlation rho (the phi coefficient between a pair's two outcomes) is given: shared seeds
    make pairs positively correlated in practice, which the paired test turns into power, so
    rho = 0 is the cautious choice;
  * independent arms (rates.newcombe_indep, Newcombe's hybrid score: fractional designs, whose
    runs have no partner): two binomials.

Why not the normal approximation on Cohen's h (what `plan` printed before): near 0 % it
promised 80 % power for 0 % -> 4 % with 96 pairs, where the paired Newcombe test has 34 %.

Speed (about 25 ms for 500 pairs around 50 %): with rho = 0 the paired sum is 2-d (see
paired_power); the 3-d multinomial enumeration serves rho != 0 and checks the 2-d sum. Both
cut each count to its binomial marginal less tails under 1e-10 and drop outcomes under 1e-14
of probability: about 1e-6 of probability at most, far below the 0.1-point grid of `plan`. The
intervals are computed in numpy with the same operations as statsmodels' Wilson interval and
rates.newcombe_paired / newcombe_indep (checked equal in tests/results/test_rate_power.py).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
from scipy.special import gammaln
from scipy.stats import binom, hypergeom, norm

ALPHA, POWER = 0.05, 0.80
TAIL = 1e-10  # binomial tail dropped per count
TINY = 1e-14  # single outcomes below this probability are dropped
Array = np.ndarray


# ------------------------------------------------------------------------------ intervals
def wilson_np(x: Array, n: Array | int, alpha: float = ALPHA) -> tuple[Array, Array]:
    """Wilson score interval, statsmodels' proportion_confint(method="wilson") written over
    arrays (same operations in the same order, clipped to [0, 1] as it is)."""
    x, n = np.asarray(x, float), np.asarray(n, float)
    q = x / n
    crit = norm.isf(alpha / 2)
    crit2 = crit ** 2
    denom = 1 + crit2 / n
    center = (q + crit2 / (2 * n)) / denom
    dist = crit * np.sqrt(q * (1.0 - q) / n + crit2 / (4.0 * n ** 2)) / denom
    return np.clip(center - dist, 0, 1), np.clip(center + dist, 0, 1)


def newcombe_paired_np(both: Array, on_only: Array, off_only: Array, neither: Array,
                       alpha: float = ALPHA) -> tuple[Array, Array]:
    """rates.newcombe_paired over arrays of counts (method 10 of Newcombe 1998, with its
    continuity-corrected phi)."""
    a, b, c, d = (np.asarray(v, float) for v in (both, on_only, off_only, neither))
    n = a + b + c + d
    r_on, r_off = a + b, a + c
    p1, p2 = r_on / n, r_off / n
    l1, u1 = wilson_np(r_on, n, alpha)
    l2, u2 = wilson_np(r_off, n, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        prod = np.sqrt(r_on * (n - r_on) * r_off * (n - r_off))
        cross = a * d - b * c
        phi = np.where(cross > n / 2, (cross - n / 2) / prod, np.where(cross >= 0, 0.0, cross / prod))
    phi = np.where(prod == 0, 0.0, phi)  # an arm with no events (or all): phi = 0
    diff = p1 - p2
    low = diff - np.sqrt(np.maximum(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2
                                    - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = diff + np.sqrt(np.maximum(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2
                                     - 2 * phi * (p2 - l2) * (u1 - p1)))
    return low, high


def newcombe_indep_np(x1: Array, n1: int, x0: Array, n0: int, alpha: float = ALPHA
                      ) -> tuple[Array, Array]:
    """rates.newcombe_indep (statsmodels' confint_proportions_2indep(method="newcomb")) over
    arrays: Newcombe's hybrid score interval for x1/n1 - x0/n0."""
    x1, x0 = np.asarray(x1, float), np.asarray(x0, float)
    p1, p0 = x1 / n1, x0 / n0
    l1, u1 = wilson_np(x1, n1, alpha)
    l0, u0 = wilson_np(x0, n0, alpha)
    diff = p1 - p0
    return (diff - np.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2),
            diff + np.sqrt((p0 - l0) ** 2 + (u1 - p1) ** 2))


# ------------------------------------------------------------------------------ power
def pair_probs(p_on: float, p_off: float, rho: float = 0.0) -> tuple[float, float, float, float]:
    """(p11, p10, p01, p00) of a pair whose runs have event rates p_on, p_off and phi
    correlation rho; ValueError where no such distribution exists."""
    p11 = p_on * p_off + rho * math.sqrt(p_on * (1 - p_on) * p_off * (1 - p_off))
    probs = (p11, p_on - p11, p_off - p11, 1 - p_on - p_off + p11)
    if min(probs) < -1e-12:
        raise ValueError(f"rho {rho} is impossible with rates {p_on} and {p_off}")
    return tuple(max(0.0, p) for p in probs)  # type: ignore[return-value]


def _count_range(n: int, p: float) -> Array:
    """The counts of a Binomial(n, p) marginal outside its TAIL tails."""
    if p <= 0:
        return np.zeros(1, int)
    if p >= 1:
        return np.full(1, n)
    lo, hi = binom.ppf(TAIL, n, p), binom.isf(TAIL, n, p)
    return np.arange(max(0, int(lo) - 1), min(n, int(hi) + 1) + 1)


def _log_pmf(counts: list[Array], probs: tuple[float, ...], n: int) -> Array:
    """Multinomial log probability of each outcome (counts broadcast against each other)."""
    out = gammaln(n + 1)
    for k, p in zip(counts, probs):
        out = out - gammaln(k + 1) + (k * math.log(p) if p > 0 else np.where(k == 0, 0.0, -np.inf))
    return out


def paired_power(n: int, p_on: float, p_off: float, alpha: float = ALPHA, rho: float = 0.0
                 ) -> float:
    """Probability that the paired Newcombe interval from n pairs excludes 0 (either side).

    rho = 0: a 2-d sum. The interval's arms depend only on the events per arm (r_on, r_off),
    and phi only on a*d - b*c = a*n - r_on*r_off, which grows with `both` (a): so for given
    (r_on, r_off) the test rejects exactly when a reaches a threshold k*, found by bisection on
    the interval itself. With independent runs r_on and r_off are independent binomials and a
    given them is hypergeometric (the on-events' pairs are a random subset), so the power is
    sum P(r_on) P(r_off) P(a >= k*). Other rho: the 3-d enumeration, paired_power_enumerated."""
    if n < 1:
        return math.nan
    if rho != 0.0:
        return paired_power_enumerated(n, p_on, p_off, alpha, rho)
    i, j = np.ix_(_count_range(n, p_on), _count_range(n, p_off))
    weight = binom.pmf(i, n, p_on) * binom.pmf(j, n, p_off)
    i, j = (np.broadcast_to(v, weight.shape)[weight > TINY] for v in (i, j))
    weight = weight[weight > TINY]
    k_star = _reject_threshold(n, i, j, alpha)
    # P(a >= k*) from scipy's hypergeometric tail (microseconds a call) only where it is
    # neither ~1 nor ~0: beyond `slack` of its mean a hypergeometric count has tails under
    # exp(-28) ~ 7e-13 (Hoeffding 1963, sec. 6: exp(-2 t^2 / draws), draws min(r_on, r_off))
    mean, slack = i * j / n, np.sqrt(14.0 * np.minimum(i, j))
    p_reject = (k_star <= np.maximum(np.maximum(0, i + j - n), mean - slack)).astype(float)
    inside = (p_reject == 0) & (k_star <= np.minimum(np.minimum(i, j), mean + slack))
    p_reject[inside] = hypergeom.sf(k_star[inside] - 1, n, i[inside], j[inside])
    return float((weight * p_reject).sum())


def _reject_threshold(n: int, r_on: Array, r_off: Array, alpha: float) -> Array:
    """Per (r_on, r_off): the smallest count of `both` at which the paired interval excludes 0
    (min(r_on, r_off) + 1 where none does). Rejection is monotone in `both` for given margins
    (see paired_power), so bisection over its support finds the edge."""
    k_min, k_max = np.maximum(0, r_on + r_off - n), np.minimum(r_on, r_off)  # support of both
    lo, hi = k_min - 1, k_max + 1  # rejects nowhere at or below lo; hi = k_max + 1 means none
    while np.any(hi - lo > 1):
        active = hi - lo > 1
        mid = (lo + hi) // 2
        a = np.clip(mid, k_min, k_max)  # (settled entries: any count in the support will do)
        low, high = newcombe_paired_np(a, r_on - a, r_off - a, n - r_on - r_off + a, alpha)
        rejects = active & ((low > 0) | (high < 0))
        hi = np.where(rejects, mid, hi)
        lo = np.where(active & ~rejects, mid, lo)
    return hi


def paired_power_enumerated(n: int, p_on: float, p_off: float, alpha: float = ALPHA,
                            rho: float = 0.0) -> float:
    """paired_power by enumerating the multinomial outcomes (both, on only, off only, neither):
    any rho, slower (about 0.5 s at n = 500 around 50 %); the check on the 2-d sum."""
    if n < 1:
        return math.nan
    probs = pair_probs(p_on, p_off, rho)
    a, b, c = np.ix_(*(_count_range(n, p) for p in probs[:3]))
    d = n - a - b - c
    logp = _log_pmf([a, b, c, np.maximum(d, 0)], probs, n)
    pmf = np.where(d >= 0, np.exp(logp), 0.0)
    keep = pmf > TINY
    shape = pmf.shape
    a, b, c = (np.broadcast_to(v, shape)[keep] for v in (a, b, c))
    low, high = newcombe_paired_np(a, b, c, n - a - b - c, alpha)
    return float(pmf[keep][(low > 0) | (high < 0)].sum())


def indep_power(n_on: int, n_off: int, p_on: float, p_off: float, alpha: float = ALPHA) -> float:
    """Probability that Newcombe's hybrid score interval for two independent arms of n_on and
    n_off runs excludes 0 (either side)."""
    if n_on < 1 or n_off < 1:
        return math.nan
    x1, x0 = np.ix_(_count_range(n_on, p_on), _count_range(n_off, p_off))
    pmf = binom.pmf(x1, n_on, p_on) * binom.pmf(x0, n_off, p_off)
    low, high = newcombe_indep_np(x1, n_on, x0, n_off, alpha)
    return float(pmf[(low > 0) | (high < 0)].sum())


# ------------------------------------------------------------------------------ detectable
def smallest_detectable(power_at: Callable[[float], float], target: float = POWER,
                        step: float = 0.001) -> float:
    """Smallest difference on a grid of `step` in (0, 1] from which power stays >= target.

    Discreteness makes power wiggle as the difference grows, so the first crossing is not the
    answer: bisection finds a crossing (power below target just under it), then a scan upward,
    grid point by grid point, moves past every dip below target until power reaches
    (1 + target) / 2 (a wiggle back under target from there is not looked for: they are a few
    points deep at most). NaN where even a difference of 1 falls short."""
    units = round(1 / step)
    if not power_at(1.0) >= target:
        return math.nan
    lo, hi = 0, units  # in steps; power below target at lo (0: the test's size), not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_at(mid * step) >= target else (mid, hi)
    answer: Optional[int] = hi
    k, safe = hi, (1 + target) / 2
    while k < units:
        k += 1
        p = power_at(k * step)
        if p < target:
            answer = None  # a dip: the answer lies above it
        elif answer is None:
            answer = k
        if p >= safe:
            break
    assert answer is not None  # power_at(1.0) >= target
    return round(answer * step, 9)


def detectable_rise(test: Callable[[float, float], float], target: float = POWER) -> float:
    """Smallest rate r from which `test(r, 0)` (power to tell r from 0 %) stays >= target."""
    return smallest_detectable(lambda r: test(r, 0.0), target)


def detectable_around_half(test: Callable[[float, float], float], target: float = POWER) -> float:
    """Smallest difference d from which `test(0.5 + d/2, 0.5 - d/2)` stays >= target."""
    return smallest_detectable(lambda d: test(0.5 + d / 2, 0.5 - d / 2), target)
