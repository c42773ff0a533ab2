"""Differences of rates (divergence, collapse) with score intervals that mean something at small n.

A bootstrap of all-zero data cannot express uncertainty: 0/8 vs 0/8 bootstraps to [0, 0], yet
it is compatible with a true difference of about +-32 %. Here:

  * independent arms: Newcombe's hybrid score interval (Newcombe 1998, Stat Med 17:873,
    method 10), from statsmodels' confint_proportions_2indep(method="newcomb");
  * paired runs (a run with the factor on and its partner with it off: same other factors, same
    seed): Newcombe's paired square-and-add interval (Newcombe 1998, Stat Med 17:2635, method 10,
    with the continuity-corrected phi; Fagerland, Lydersen & Laake 2017, "Statistical Analysis
    of Contingency Tables", ch. 8). statsmodels 0.15 has no paired version; it is built here on
    statsmodels' Wilson intervals.

p-values are those of the interval itself: the smallest alpha at which the (1 - alpha) interval
excludes 0, found by bisection, so "the CI excludes 0 after Holm" and "the Holm-adjusted p is
below 0.05" are the same statement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RateDiff:
    """Rate with the factor on minus rate with it off, and its 95 % interval."""

    events_on: int
    n_on: int
    events_off: int
    n_off: int
    diff: float
    low: float
    high: float
    p: float
    paired: bool
    method: str
    pairs: Optional[tuple[int, int, int, int]] = None  # paired: (both, on_only, off_only, neither)

    @property
    def untested(self) -> bool:
        """Neither arm had a single event: the data cannot show that a fix prevents it."""
        return self.events_on == 0 and self.events_off == 0

    def counts(self) -> str:
        return f"{self.events_on}/{self.n_on} vs {self.events_off}/{self.n_off}"


def wilson(x: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(x, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def newcombe_indep(x1: int, n1: int, x0: int, n0: int, alpha: float = 0.05) -> tuple[float, float]:
    """Interval for x1/n1 - x0/n0 (independent samples), Newcombe's hybrid score method."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    lo, hi = confint_proportions_2indep(x1, n1, x0, n0, method="newcomb", compare="diff",
                                       alpha=alpha)
    return float(lo), float(hi)


def newcombe_paired(both: int, on_only: int, off_only: int, neither: int,
                    alpha: float = 0.05) -> tuple[float, float]:
    """Interval for p_on - p_off from n pairs: `both` pairs had the event in both runs, `on_only`
    only in the run with the factor on, `off_only` only with it off, `neither` in none."""
    n = both + on_only + off_only + neither
    if n == 0:
        return math.nan, math.nan
    r_on, r_off = both + on_only, both + off_only  # events per arm
    p1, p2 = r_on / n, r_off / n
    l1, u1 = wilson(r_on, n, alpha)
    l2, u2 = wilson(r_off, n, alpha)
    if min(r_on, n - r_on, r_off, n - r_off) == 0:
        phi = 0.0
    else:
        a = both * neither - on_only * off_only
        prod = math.sqrt(r_on * (n - r_on) * r_off * (n - r_off))
        phi = (a - n / 2) / prod if a > n / 2 else 0.0 if a >= 0 else a / prod
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return low, high


def ci_pvalue(ci: Callable[[float], tuple[float, float]], estimate: float) -> float:
    """Smallest alpha whose (1 - alpha) interval excludes 0 (1.0 if even the 0 % interval holds 0)."""
    if not math.isfinite(estimate) or estimate == 0:
        return 1.0

    def excludes(alpha: float) -> bool:
        lo, hi = ci(alpha)
        return lo > 0 or hi < 0

    if excludes(1e-12):
        return 1e-12
    if not excludes(1 - 1e-9):
        return 1.0
    lo, hi = 1e-12, 1 - 1e-9  # excludes(hi) is True, excludes(lo) False
    for _ in range(60):
        mid = math.sqrt(lo * hi) if hi < 0.5 else (lo + hi) / 2
        lo, hi = (lo, mid) if excludes(mid) else (mid, hi)
        if hi - lo < 1e-6 * hi:
            break
    return hi


def rate_diff_indep(x1: int, n1: int, x0: int, n0: int) -> RateDiff:
    if n1 == 0 or n0 == 0:
        return RateDiff(x1, n1, x0, n0, math.nan, math.nan, math.nan, math.nan, False, "n/a")
    d = x1 / n1 - x0 / n0
    lo, hi = newcombe_indep(x1, n1, x0, n0)
    p = indep_p(x1, n1, x0, n0)
    return RateDiff(x1, n1, x0, n0, d, lo, hi, p, False, "Newcombe hybrid score")


def rate_diff_paired(on: Sequence[float], off: Sequence[float]) -> RateDiff:
    """From paired 0/1 outcomes (on[i] and off[i] are the two runs of pair i)."""
    on, off = np.asarray(on, bool), np.asarray(off, bool)
    both, on_only = int((on & off).sum()), int((on & ~off).sum())
    off_only, neither = int((~on & off).sum()), int((~on & ~off).sum())
    n = len(on)
    if n == 0:
        return RateDiff(0, 0, 0, 0, math.nan, math.nan, math.nan, math.nan, True, "n/a")
    d = (on_only - off_only) / n
    lo, hi = newcombe_paired(both, on_only, off_only, neither)
    return RateDiff(int(on.sum()), n, int(off.sum()), n, d, lo, hi,
                    paired_p(both, on_only, off_only, neither), True, "Newcombe paired score",
                    (both, on_only, off_only, neither))


def paired_p(both: int, on_only: int, off_only: int, neither: int) -> float:
    """p of the paired interval (see rate_diff_paired), from the four kinds of pair."""
    n = both + on_only + off_only + neither
    d = (on_only - off_only) / n if n else math.nan
    return ci_pvalue(lambda a: newcombe_paired(both, on_only, off_only, neither, a), d)


def indep_p(x1: int, n1: int, x0: int, n0: int) -> float:
    """p of the independent interval (see rate_diff_indep)."""
    return ci_pvalue(lambda a: newcombe_indep(x1, n1, x0, n0, a), x1 / n1 - x0 / n0)


def rate_difference(runs: pd.DataFrame, factor: str, outcome: str, others: Sequence[str],
                    ref=False, level=True) -> RateDiff:
    """Effect of `factor` (ref -> level) on the 0/1 column `outcome`, paired where the design
    pairs runs (the same rule as `analysis.paired_effect`: partners share the other factors and
    the seed; where two or more pairs exist only the pairs count, as in one-at-a-time designs,
    whose other runs differ in more than this factor), else independent (fractional designs,
    which hold no two runs that differ in one factor only)."""
    keys = [g for g in others if g in runs] + ["seed"]
    a = runs[runs[factor] == ref].groupby(keys)[outcome].max()
    b = runs[runs[factor] == level].groupby(keys)[outcome].max()
    joined = pd.concat([a.rename("off"), b.rename("on")], axis=1, join="inner").dropna()
    if len(joined) >= 2:  # one-at-a-time: the pairs only
        return rate_diff_paired(joined["on"].to_numpy(), joined["off"].to_numpy())
    on, off = runs.loc[runs[factor] == level, outcome], runs.loc[runs[factor] == ref, outcome]
    return rate_diff_indep(int(on.sum()), len(on), int(off.sum()), len(off))


def exact_coverage_indep(p1: float, p0: float, n1: int, n0: int,
                         ci: Callable[[int, int, int, int], tuple[float, float]] = newcombe_indep
                         ) -> float:
    """Probability that the interval covers p1 - p0, summed exactly over every outcome."""
    from scipy.stats import binom

    cover = 0.0
    for x1 in range(n1 + 1):
        for x0 in range(n0 + 1):
            lo, hi = ci(x1, n1, x0, n0)
            if lo - 1e-12 <= p1 - p0 <= hi + 1e-12:
                cover += binom.pmf(x1, n1, p1) * binom.pmf(x0, n0, p0)
    return cover


def rate_table(runs: pd.DataFrame, factors: Sequence[str],
               outcomes: Sequence[str] = ("diverged", "collapsed")) -> pd.DataFrame:
    """One row per two-level factor x rate outcome, in the columns of `analysis.main_effects`
    (effect = rate on minus rate off) plus the counts per arm, the p-value and the method."""
    rows = []
    for f in factors:
        levels = sorted(runs[f].dropna().unique())
        if len(levels) != 2:
            continue
        others = [g for g in factors if g != f]
        for out in outcomes:
            rd = rate_difference(runs, f, out, others, levels[0], levels[1])
            contrast = ("on vs off" if isinstance(levels[1], (bool, np.bool_)) else
                        f"{levels[1]} vs {levels[0]}")
            rows.append({"factor": f, "contrast": contrast, "outcome": out, "effect": rd.diff,
                         "low": rd.low, "high": rd.high, "n": rd.n_on + rd.n_off,
                         "paired": rd.paired, "dropped": 0,
                         "mean_off": rd.events_off / rd.n_off if rd.n_off else math.nan,
                         "mean_on": rd.events_on / rd.n_on if rd.n_on else math.nan,
                         "counts": rd.counts(), "p": rd.p, "method": rd.method})
    return pd.DataFrame(rows)
