"""A fix's effect in each background: paired runs keyed by the whole run, never pooled.

A one-at-a-time design asks two questions of every fix, and they need not have one answer:

  * *added to broken*:   add:X minus broken  (what the fix does where the others are missing);
  * *dropped from fixed*: fixed minus drop:X  (what it does where the others are present).

Both are "the fix on minus the fix off", in two backgrounds. Each is estimated and tested on
its own, per regime (a combination of the stress factors other than the axis: fp16 is not fp32).
Two runs form a pair only when they share the seed *and* the stress cell (rung and regime): a
fix's effect at lr 10 is never compared with its partner at lr 1e-3.

Continuous outcomes (F1, loss): per seed, the difference averaged over the rungs where both runs
exist, then a t interval over the seeds (with 3 seeds, df = 2). Rungs of one seed share its init
and data order, so they are not independent replicates: the seed is the unit. Where every seed
gives the same difference the t interval has zero width; that is printed as "all n seeds agree",
with no interval, never as certainty. Rates: Newcombe's paired score interval over the pairs.

Factorial designs have no roles; there a fix's backgrounds are the states of the other fixes
(every pair of cells that differ in that fix only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ablations.results import rates

ADDED, DROPPED = "added to broken", "dropped from fixed"


# ------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Mean:
    """A mean with its 95 % t interval; `note` says why there is no interval."""

    effect: float
    low: float
    high: float
    p: float
    n: int
    note: str = ""


def paired_t(d: Sequence[float], level: float = 0.95) -> Mean:
    """t interval of the mean of paired differences (exact under normal differences, and
    checked by simulation at 3 and 6 seeds in benchmarks/coverage.py)."""
    d = np.asarray([v for v in d if np.isfinite(v)], dtype=float)
    n = len(d)
    if n == 0:
        return Mean(math.nan, math.nan, math.nan, math.nan, 0, "no pair")
    m = float(d.mean())
    if n == 1:
        return Mean(m, math.nan, math.nan, math.nan, 1, "one pair: no interval")
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(m)):  # equal but for rounding
        return Mean(m, math.nan, math.nan, math.nan, n, f"all {n} seeds agree")
    se = sd / math.sqrt(n)
    h = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(m) / se, n - 1))
    return Mean(m, m - h, m + h, p, n)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Mean:
    """mean(a) - mean(b) for independent samples: Welch's t interval."""
    a = np.asarray([v for v in a if np.isfinite(v)], float)
    b = np.asarray([v for v in b if np.isfinite(v)], float)
    if len(a) < 2 or len(b) < 2:
        return Mean(math.nan, math.nan, math.nan, math.nan, len(a) + len(b), "too few seeds")
    m = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Mean(m, math.nan, math.nan, math.nan, len(a) + len(b), "every seed agrees")
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0))
    h = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Mean(m, m - h, m + h, float(2 * stats.t.sf(abs(m) / se, df)), len(a) + len(b))


# ------------------------------------------------------------------------------ the pairs
@dataclass(frozen=True)
class Contrast:
    """Fix `fix` switched on, in `background`: runs `off` vs runs `on` (one recipe each)."""

    fix: str
    background: str
    off: pd.DataFrame
    on: pd.DataFrame


def has_roles(runs: pd.DataFrame) -> bool:
    return "roles" in runs and runs["roles"].fillna("").astype(str).str.len().gt(0).any()


def by_role(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Runs per one-at-a-time role (a run can hold several: with one or two fixes, add:X and
    drop:Y can be the same cell)."""
    idx: dict[str, list] = {}
    for i, roles in runs["roles"].fillna("").astype(str).items():
        for role in roles.split(","):
            if role:
                idx.setdefault(role, []).append(i)
    return {k: runs.loc[v] for k, v in idx.items()}


def contrasts(runs: pd.DataFrame, design: Sequence[str]) -> list[Contrast]:
    """Every (fix, background) pair of recipes: add/drop roles, else cells differing in one fix."""
    out = []
    if has_roles(runs):
        roles = by_role(runs)
        for role in sorted(roles):
            kind, _, name = role.partition(":")
            if kind == "add" and "broken" in roles:
                out.append(Contrast(name, ADDED, roles["broken"], roles[role]))
            elif kind == "drop" and "fixed" in roles:
                out.append(Contrast(name, DROPPED, roles[role], roles["fixed"]))
        return sorted(out, key=lambda c: (c.fix, c.background != ADDED))
    for f in design:
        levels = sorted(runs[f].dropna().unique())
        if len(levels) != 2:
            continue
        others = [o for o in design if o != f]
        groups = runs.groupby(others, sort=True) if others else [((), runs)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            bg = " ".join(f"{o}={_fmt(v)}" for o, v in zip(others, key)) or "-"
            off, on = g[g[f] == levels[0]], g[g[f] == levels[1]]
            if len(off) and len(on):
                out.append(Contrast(f, bg, off, on))
    return out


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def regime_of(runs: pd.DataFrame, regime: Sequence[str]) -> pd.Series:
    if not regime:
        return pd.Series("all", index=runs.index)
    return runs[list(regime)].apply(lambda r: " ".join(f"{k}={_fmt(v)}" for k, v in r.items()),
                                    axis=1)


def paired(c: Contrast, col: str, keys: Sequence[str]) -> pd.DataFrame:
    """The two arms' `col` joined on `keys` (seed and stress cell): columns off, on."""
    a = c.off.groupby(list(keys))[col].mean()
    b = c.on.groupby(list(keys))[col].mean()
    return pd.concat([a.rename("off"), b.rename("on")], axis=1, join="inner")


def rung_text(values: Sequence, axis: Optional[str]) -> str:
    """'lr 0.001..10 (5 rungs, mean per seed)', or '-' without an axis."""
    if not axis:
        return "-"
    v = sorted(set(values))
    if not v:
        return "-"
    if len(v) == 1:
        return f"{axis} {_fmt(v[0])}"
    return f"{axis} {_fmt(v[0])}..{_fmt(v[-1])} ({len(v)} rungs, mean per seed)"


# ------------------------------------------------------------------------------ tables
def per_regime(runs: pd.DataFrame, design: Sequence[str], stress: Sequence[str],
               axis: Optional[str]):
    """(regime, contrast restricted to it) for every contrast and regime (the stress factors
    other than the axis; 'all' without any)."""
    regime = [s for s in stress if s != axis]
    for c in contrasts(runs, design):
        off = c.off.assign(_regime=regime_of(c.off, regime))
        on = c.on.assign(_regime=regime_of(c.on, regime))
        for reg in dict.fromkeys(list(off["_regime"]) + list(on["_regime"])):
            yield reg, Contrast(c.fix, c.background, off[off._regime == reg],
                                on[on._regime == reg])


def continuous(runs: pd.DataFrame, design: Sequence[str], stress: Sequence[str],
               outcome: str, axis: Optional[str] = None) -> pd.DataFrame:
    """One row per fix x background x regime: the paired effect on `outcome` (on minus off),
    averaged over the axis's rungs per seed, t interval over seeds."""
    keys = list(stress) + ["seed"]
    rows = []
    for reg, cc in per_regime(runs, design, stress, axis):
        j = paired(cc, outcome, keys)
        both = j.dropna()
        d = (both["on"] - both["off"]).groupby(level="seed").mean()
        m = paired_t(d.to_numpy())
        rungs = both.index.get_level_values(axis) if axis else []
        rows.append({"fix": cc.fix, "background": cc.background, "regime": reg,
                     "rungs": rung_text(rungs, axis), "outcome": outcome,
                     "effect": m.effect, "low": m.low, "high": m.high, "p": m.p, "n": m.n,
                     "dropped": len(j) - len(both), "note": m.note,
                     "mean_off": float(both["off"].mean()) if len(both) else math.nan,
                     "mean_on": float(both["on"].mean()) if len(both) else math.nan,
                     "_d": d.to_numpy()})
    return agreement(pd.DataFrame(rows))


def rate_tests(runs: pd.DataFrame, design: Sequence[str], stress: Sequence[str],
               outcomes: Sequence[str] = ("diverged", "collapsed"),
               axis: Optional[str] = None) -> pd.DataFrame:
    """One row per fix x background x regime x rate: paired (seed and stress cell) Newcombe."""
    keys = list(stress) + ["seed"]
    rows = []
    for reg, cc in per_regime(runs, design, stress, axis):
        for out in outcomes:
            j = paired(cc, out, keys).dropna()
            rd = rates.rate_diff_paired(j["on"].to_numpy() > 0, j["off"].to_numpy() > 0)
            rungs = j.index.get_level_values(axis) if axis else []
            rows.append({"fix": cc.fix, "background": cc.background, "regime": reg,
                         "rungs": rung_text(rungs, axis).replace(", mean per seed", ""),
                         "outcome": out, "counts": rd.counts(), "effect": rd.diff,
                         "low": rd.low, "high": rd.high, "p": rd.p, "n": len(j),
                         "untested": rd.untested or rd.events_on == rd.n_on == rd.events_off,
                         "method": rd.method, "_pairs": rd.pairs})
    return agreement(pd.DataFrame(rows))


def agreement(t: pd.DataFrame) -> pd.DataFrame:
    """Column `backgrounds`, per fix x regime x outcome: do the two backgrounds agree?

    'opposite': each background's interval excludes 0, with opposite signs; 'differ': the
    difference of the two effects excludes 0 (Welch over the seeds' differences for continuous
    outcomes, the MOVER combination of the two score intervals for rates); 'agree' otherwise
    (no difference shown, which is not a proof of none); '-' with one background."""
    if t.empty:
        return t
    t = t.copy()
    t["backgrounds"] = "-"
    for _, g in t.groupby(["fix", "regime", "outcome"], sort=False):
        if len(g) != 2:
            continue
        a, b = g.iloc[0], g.iloc[1]
        excl = [(r.low > 0 or r.high < 0) for r in (a, b)]
        if all(excl) and np.sign(a.effect) != np.sign(b.effect):
            verdict = "opposite"
        else:
            diff = _difference(a, b)
            verdict = ("differ" if math.isfinite(diff[0]) and (diff[0] > 0 or diff[1] < 0)
                       else "agree")
        t.loc[g.index, "backgrounds"] = verdict
    return t


def _difference(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """95 % interval of effect_a - effect_b for two independent contrasts."""
    if "_d" in a and isinstance(a["_d"], np.ndarray):
        m = welch(a["_d"], b["_d"])
        return m.low, m.high
    # MOVER (Zou & Donner 2008): combine the two intervals' distances from their estimates
    d = a.effect - b.effect
    if not all(math.isfinite(v) for v in (a.low, a.high, b.low, b.high)):
        return math.nan, math.nan
    lo = d - math.sqrt((a.effect - a.low) ** 2 + (b.high - b.effect) ** 2)
    hi = d + math.sqrt((a.high - a.effect) ** 2 + (b.effect - b.low) ** 2)
    return lo, hi


def public(t: pd.DataFrame) -> pd.DataFrame:
    """The table without its private columns (for printing and CSV)."""
    return t[[c for c in t.columns if not c.startswith("_")]] if not t.empty else t


def as_effects(t: pd.DataFrame) -> pd.DataFrame:
    """A per-background table in the columns the report's figures and the tracker read:
    `factor`, and the background (with the regime, where there are several) as `contrast`."""
    if t.empty:
        return t
    t = public(t).rename(columns={"fix": "factor"})
    t.insert(1, "contrast", [b if r == "all" else f"{b}, {r}" for b, r in
                             zip(t["background"], t["regime"])])
    return t
