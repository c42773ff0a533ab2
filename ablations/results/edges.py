"""The edge of stability as an estimated quantity: LR50 and its shift, with intervals.

A recipe fails above some learning rate. Each seed has its own edge: runs of that seed are stable
up to it and fail beyond. The dose-response view of toxicology (probit analysis) is the model:
the *tolerance* of a seed, its edge E in log10 units, is drawn from Normal(mu, sigma) over seeds,
so a run at rung x fails with probability Phi((x - mu) / sigma), and

    LR50 = 10 ** mu         the lr at which half the runs fail.

Why not a binomial GLM over runs: in a study every seed is run at *every* rung, so its runs are
one tolerance observed along the ladder, not independent Bernoulli draws. A binomial GLM counts
a seed's five rungs as five pieces of evidence and gives intervals that are too narrow. Here a
seed contributes what it shows: its edge lies above its last stable rung and at or below its
first failed one (interval-censored). This is the same probit curve, with the seeds' runs
counted once.

  * Too slow is not unstable. The upper edge is read on the rungs at and above the recipe's best
    rung (the rung with the lowest median final loss among those where most seeds are stable):
    a 20-step run that has not learned at lr 1e-3 is too slow, not past its edge.
  * Missing runs are never stable: a missing rung says nothing, so a seed's interval runs from
    its last *known* stable rung to its first *known* failure; missing at the top, it is censored
    at its last present rung.
  * Separation (every seed fails above one rung and none below: the usual case with 3 seeds on a
    decade ladder) drives sigma to 0, where the likelihood is flat between two rungs. The
    profile likelihood handles it as it is: the interval is the set of values the data cannot
    reject, and the point estimate is the middle of the flat top. No penalty is added.
  * Censoring: an edge beyond the ladder cannot be measured. When the profile stays flat up to
    the end of the grid (two rungs past the ladder), that side of the interval is open and the
    value is printed "> 10" or "< 0.001", never as a number.

Intervals are profile-likelihood intervals over a grid of mu and sigma, calibrated for few seeds:
for uncensored normal data the profile-likelihood ratio W of a mean (or of a difference of two
means with a common sigma) is n log(1 + T^2 / df), T ~ t(df), so {W <= n log(1 + t^2 / df)} is
the exact t interval there. The same threshold (df = seeds - 1, or seeds of both - 2) is used with
censored data. `benchmarks/coverage.py` checks the coverage with planted edges (edges drawn from
a continuous distribution, rungs a decade apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import special, stats

GRID_STEP = 0.02  # grid of mu, in axis units (log10 lr): a fiftieth of a decade
PAST = 2.0  # the grid reaches this many rung spacings beyond both ends of the ladder
# sigma grid, in axis units: seeds' edges are taken to spread by at most 2 decades (sd); wider
# sigmas let a recipe that failed at every rung claim an edge far inside the ladder
SIGMAS = np.geomspace(0.01, 2.0, 40)
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """One seed's edge, known to lie in (low, high]; -inf / +inf where open."""

    low: float
    high: float


def seed_interval(rungs: Sequence[float], stable: Sequence[Optional[bool]], start: float
                  ) -> Interval:
    """The edge of one seed from its rungs at and above `start` (axis units, ascending order
    not required); `stable` None where the run is missing. The first known failure closes it."""
    pairs = sorted((x, s) for x, s in zip(rungs, stable) if x >= start - 1e-12)
    last_ok = -math.inf
    for x, s in pairs:
        if s is None:
            continue
        if not s:
            return Interval(last_ok, x)
        last_ok = x
    return Interval(last_ok, math.inf)


def _grid(ladder: Sequence[float]) -> np.ndarray:
    lad = np.sort(np.asarray(ladder, float))
    spacing = float(np.max(np.diff(lad))) if len(lad) > 1 else 1.0
    lo, hi = lad[0] - PAST * spacing, lad[-1] + PAST * spacing
    return np.arange(lo, hi + GRID_STEP / 2, GRID_STEP)


def _loglik(intervals: Sequence[Interval], mu: np.ndarray) -> np.ndarray:
    """log L(mu, sigma) on the grid: [len(mu), len(SIGMAS)]."""
    out = np.zeros((len(mu), len(SIGMAS)))
    m, s = mu[:, None], SIGMAS[None, :]
    for iv in intervals:
        zl = (iv.low - m) / s if math.isfinite(iv.low) else np.full_like(m * s, -np.inf)
        zh = (iv.high - m) / s if math.isfinite(iv.high) else np.full_like(m * s, np.inf)
        # P(zl < Z <= zh), computed on the side of the tail that keeps precision
        upper = np.minimum(zl, zh) > 0
        p = np.where(upper, special.ndtr(-zl) - special.ndtr(-zh), special.ndtr(zh) - special.ndtr(zl))
        out += np.log(np.maximum(p, 1e-300))
    return out


def _threshold(n: int, df: int) -> float:
    """Half the critical profile-likelihood ratio: n/2 log(1 + t^2 / df) (see the docstring)."""
    if df < 1:
        return math.inf
    t = float(stats.t.ppf(0.5 + LEVEL / 2, df))
    return 0.5 * n * math.log1p(t * t / df)


def _pvalue(w: float, n: int, df: int) -> float:
    """p of the calibrated likelihood-ratio test: W = 2 (l_max - l_profile(value))."""
    if df < 1 or not math.isfinite(w):
        return math.nan
    t2 = df * math.expm1(max(w, 0.0) / n)
    return float(2 * stats.t.sf(math.sqrt(t2), df))


@dataclass(frozen=True)
class EdgeEstimate:
    """A profile-likelihood estimate in axis units (log10 for lr). `low`/`high` are the interval
    ends; `open_low`/`open_high` say that side reaches past the ladder (censored)."""

    value: float
    low: float
    high: float
    open_low: bool
    open_high: bool
    p: float  # of "value = 0" for a shift; nan for a location
    n: int  # seeds used
    note: str = ""

    @property
    def censored(self) -> bool:
        return self.open_low or self.open_high

    @property
    def measured(self) -> bool:
        return math.isfinite(self.low) or math.isfinite(self.high)


def _summarise(x: np.ndarray, prof: np.ndarray, thr: float, p: float, n: int,
               note: str = "") -> EdgeEstimate:
    top = prof.max()
    inside = np.flatnonzero(prof >= top - thr)
    flat = np.flatnonzero(prof >= top - 1e-9)
    lo_i, hi_i = inside[0], inside[-1]
    open_low, open_high = lo_i == 0, hi_i == len(x) - 1
    value = float((x[flat[0]] + x[flat[-1]]) / 2)
    if flat[0] == 0 or flat[-1] == len(x) - 1:  # the best value lies past the ladder
        value = math.nan
    return EdgeEstimate(value, -math.inf if open_low else float(x[lo_i]),
                        math.inf if open_high else float(x[hi_i]), bool(open_low), bool(open_high),
                        p, n, note)


def lr50(intervals: Sequence[Interval], ladder: Sequence[float]) -> EdgeEstimate:
    """log10 LR50 of one recipe (one regime) from its seeds' edge intervals."""
    n = len(intervals)
    mu = _grid(ladder)
    if n == 0:
        return EdgeEstimate(math.nan, math.nan, math.nan, False, False, math.nan, 0, "no seed")
    if n == 1:
        return EdgeEstimate(math.nan, math.nan, math.nan, False, False, math.nan, 1,
                            "one seed: no interval")
    prof = _loglik(intervals, mu).max(axis=1)
    return _summarise(mu, prof, _threshold(n, n - 1), math.nan, n)


def shift(off: Sequence[Interval], on: Sequence[Interval], ladder: Sequence[float]) -> EdgeEstimate:
    """log10 LR50(on) - log10 LR50(off): the fix's effect on the edge (+1 = ten times larger),
    with a common sigma; p of "no shift" from the same calibrated likelihood ratio."""
    n = len(off) + len(on)
    mu = _grid(ladder)
    if len(off) == 0 or len(on) == 0 or n < 3:
        return EdgeEstimate(math.nan, math.nan, math.nan, False, False, math.nan, n,
                            "too few seeds to say")
    la, lb = _loglik(off, mu), _loglik(on, mu)  # [G, S]
    g = len(mu)
    # profile over mu_off for every shift k (in grid steps) and sigma: max_i la[i] + lb[i + k]
    ks = np.arange(-(g - 1), g)
    prof = np.full(len(ks), -np.inf)
    for j, k in enumerate(ks):
        if k >= 0:
            v = la[: g - k] + lb[k:]
        else:
            v = la[-k:] + lb[: g + k]
        prof[j] = v.max()
    d = ks * GRID_STEP
    thr = _threshold(n, n - 2)
    w0 = 2 * (prof.max() - prof[g - 1])  # ks[g - 1] == 0
    est = _summarise(d, prof, thr, _pvalue(w0, n, n - 2), n)
    # The grid of mu ends two rungs past the ladder, so a shift towards an edge that is itself
    # past the ladder is cut by the grid, not by the data: that side is open (censored).
    # A recipe's edge is censored above when no seed of it failed (every interval open above),
    # below when every seed failed from the start.
    above = [all(math.isinf(i.high) for i in x) for x in (off, on)]
    below = [all(math.isinf(i.low) for i in x) for x in (off, on)]
    open_low = est.open_low or below[1] or above[0]
    open_high = est.open_high or above[1] or below[0]
    if open_low == est.open_low and open_high == est.open_high:
        return est
    return EdgeEstimate(math.nan, -math.inf if open_low else est.low,
                        math.inf if open_high else est.high, open_low, open_high, est.p, n, est.note)


# ------------------------------------------------------------------------------ printing
def fmt_location(e: EdgeEstimate, axis: str, log: bool = True,
                 ladder: Optional[Sequence[float]] = None) -> str:
    """LR50 as the reader wants it: '0.32 [0.1, 1]', '> 10', '< 0.001', or why there is none.
    An interval end past the ladder (`ladder`, axis units) is printed as a bound too: the model
    may reach there, the data do not."""
    if not e.measured:
        return e.note or "n/a"
    f = (lambda v: f"{10 ** v:.2g}") if log else (lambda v: f"{v:.3g}")
    lo_lad, hi_lad = (min(ladder), max(ladder)) if ladder else (-math.inf, math.inf)
    if e.open_high and e.open_low:
        return "not identified (every seed censored)"
    if e.open_high:
        return f"> {f(max(e.low, lo_lad))}" if e.low >= lo_lad else f"> {f(e.low)}"
    if e.open_low:
        return f"< {f(min(e.high, hi_lad))}" if e.high <= hi_lad else f"< {f(e.high)}"
    low = f"< {f(lo_lad)}" if e.low < lo_lad else f(e.low)
    high = f"> {f(hi_lad)}" if e.high > hi_lad else f(e.high)
    return f"{f(e.value)} [{low}, {high}]"


def fmt_shift(e: EdgeEstimate, span: Optional[float] = None) -> str:
    """A shift in decades: '+1.0 [+0.4, +1.9]', '> +0.4' (one side censored), or why none. An
    interval end larger than the ladder's span (`span`) is printed as a bound: no ladder of that
    span can show a larger shift."""
    if not e.measured:
        return e.note or "n/a"
    if e.open_high and e.open_low:
        return "not identified (both edges past the ladder)"
    if e.open_high:
        return f"> {e.low:+.1f}"
    if e.open_low:
        return f"< {e.high:+.1f}"
    span = math.inf if span is None else span
    low = f"< {-span:+.1f}" if e.low < -span else f"{e.low:+.1f}"
    high = f"> {span:+.1f}" if e.high > span else f"{e.high:+.1f}"
    return f"{e.value:+.1f} [{low}, {high}]"
