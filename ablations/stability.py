"""Stability under stress: where each recipe breaks, and how far each fix moves that edge.

A study's `stress:` factors (e.g. an lr ladder, precision) are crossed with its design's cells.
Here a *recipe* is a design cell (its fix states; the one-at-a-time role names it: broken, fixed,
add:X, drop:X), a *regime* a combination of the stress factors other than the axis, and the
*axis* the ladder along which the edge is measured: `lr` when it is a stress factor, else the
first numeric one (e.g. feature_scale).

Per recipe x regime, over the axis and the seeds:
  * a run is *stable* when its final model is finite and not collapsed (status converged or
    recovered: a run whose non-finite steps were zeroed away and that ended finite counts, and
    `clean` says how many had no non-finite event at all);
  * max stable <axis>: the largest rung at which every seed is stable (per seed: the largest rung
    at which that seed is stable; a seed stable at no rung counts as one rung below the ladder,
    so that effects can be computed, and the table says "none");
  * LR sensitivity, as defined by Wortsman et al. 2023, "Small-scale proxies for large-scale
    Transformer training instabilities" (arXiv 2309.14322), sec. 2.2:
        LRS = E_eta [ min(l(eta), l0) - l* ],   l* = min_eta l(eta)
    the mean over the rungs eta of the final loss, capped at the loss at initialisation l0, above
    the best loss of the sweep. Non-finite final losses count as l0 (the min with l0 is the
    paper's way of counting a diverged run). Here l is the final validation loss and l0 the loss
    of the first training step, before any update (the same at every rung of a seed: lr does not
    act before the first update); where that is not finite, ln 2. One departure, stated: where
    no rung improves on l0 (l* >= l0: the recipe never trained) LRS is undefined (NaN), since
    the formula would give 0 and rank a recipe that never trains as the least sensitive;
  * the divergence and collapse rate per rung;
  * the step of the first non-finite value and where it happened (module:stage).
Each fix's effect is estimated per regime, paired by seed (and by the other fixes where the design
pairs them):
  * max stable lr, in log10 units (+1 = ten times larger): a t interval over the pairs, widened
    by one rung spacing on each side, because each seed's edge is only known to within a rung
    (it lies between its last stable rung and the next one), so two seeds that agree exactly
    still do not pin the shift down to better than a rung;
  * LR sensitivity: a t interval over the pairs;
  * the failure rate over the ladder's runs: the difference of the two arms' rates with
    Newcombe's hybrid score interval (statsmodels), which stays honest at 0/n vs 0/n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

STABLE_STATUSES = ("converged", "recovered")
LN2 = math.log(2.0)


# ------------------------------------------------------------------------ the definitions
def lr_sensitivity(losses: Sequence[float], init_loss: float) -> float:
    """Wortsman et al. 2023 sec. 2.2 over one sweep: mean of min(l, l0) - l*, where non-finite l
    count as l0 and l* is the smallest capped loss. NaN for an empty sweep or where no rung
    improves on l0 (never trained). One rung gives 0 (it is its own best)."""
    l0 = init_loss if math.isfinite(init_loss) else LN2
    capped = np.array([min(v, l0) if math.isfinite(v) else l0 for v in losses], dtype=float)
    if len(capped) == 0:
        return math.nan
    best = float(capped.min())
    if best >= l0:
        return math.nan
    return float(np.mean(capped - best))


def max_stable(rungs: Sequence[float], stable: Sequence[bool]) -> float:
    """The largest rung whose runs are all stable (NaN where none is). `stable` per rung."""
    ok = [r for r, s in zip(rungs, stable) if s]
    return float(max(ok)) if ok else math.nan


# ------------------------------------------------------------------------ the tables
@dataclass(frozen=True)
class StressLayout:
    """Which columns of a runs table are the design's factors, the axis and the regime."""

    design: tuple[str, ...]  # fix (design) factors
    axis: Optional[str]  # the ladder: lr, else the first numeric stress factor
    regime: tuple[str, ...]  # the other stress factors

    @property
    def has_axis(self) -> bool:
        return self.axis is not None


def layout(runs: pd.DataFrame, factors: Sequence[str], stress: Sequence[str]) -> StressLayout:
    stress = [s for s in stress if s in runs.columns]
    numeric = [s for s in stress if pd.api.types.is_numeric_dtype(runs[s])
               and not pd.api.types.is_bool_dtype(runs[s])]
    axis = "lr" if "lr" in stress else (numeric[0] if numeric else None)
    return StressLayout(tuple(f for f in factors if f not in stress), axis,
                        tuple(s for s in stress if s != axis))


def recipe_names(runs: pd.DataFrame, lay: StressLayout) -> pd.Series:
    """A readable name per run's recipe: the one-at-a-time role(s), else the fix states."""
    def name(row) -> str:
        roles = str(row.get("roles", "") or "")
        if roles:
            return roles.replace(",", "/")
        return " ".join(f"{f}={_fmt(row[f])}" for f in lay.design) or "base"
    return runs.apply(name, axis=1)


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def annotate(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    df = runs.copy()
    df["recipe"] = recipe_names(df, lay)
    df["regime"] = (df[list(lay.regime)].apply(lambda r: " ".join(f"{k}={_fmt(v)}" for k, v in
                                                                   r.items()), axis=1)
                    if lay.regime else "all")
    df["stable"] = df["status"].isin(STABLE_STATUSES)
    events = df["nonfinite_events"].fillna(0) if "nonfinite_events" in df else 0
    df["clean"] = df["stable"] & (events == 0)
    return df


def per_seed(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    """One row per recipe x regime x seed: max stable rung (log10 for lr), LR sensitivity and the
    failure rate over the ladder, with the design factors' values for pairing."""
    if not lay.has_axis:
        return pd.DataFrame()
    df = annotate(runs, lay)
    ladder = sorted(df[lay.axis].dropna().unique())
    below = _below(ladder, lay.axis)
    rows = []
    for (recipe, regime, seed), g in df.groupby(["recipe", "regime", "seed"], sort=False):
        g = g.sort_values(lay.axis)
        ms = max_stable(g[lay.axis].tolist(), g["stable"].tolist())
        init = g["init_loss"].dropna() if "init_loss" in g else pd.Series(dtype=float)
        init = init[np.isfinite(init)]
        l0 = float(init.median()) if len(init) else LN2
        row = {"recipe": recipe, "regime": regime, "seed": seed,
               "max_stable": ms, "max_stable_log10": _log(ms if math.isfinite(ms) else below,
                                                          lay.axis),
               "lr_sensitivity": lr_sensitivity(g["final_val_loss"].tolist(), l0),
               "best_loss": float(np.nanmin(np.where(np.isfinite(g["final_val_loss"]),
                                                     g["final_val_loss"], np.nan)))
               if np.isfinite(g["final_val_loss"]).any() else math.nan,
               "init_loss": l0, "fail_rate": float(1.0 - g["stable"].mean()), "rungs": len(g)}
        for f in lay.design + lay.regime:
            row[f] = g[f].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _below(ladder: list, axis: str) -> float:
    """One rung below the ladder (the value a seed stable nowhere is counted at)."""
    if len(ladder) < 2:
        return ladder[0] / 10 if ladder and ladder[0] > 0 else math.nan
    if ladder[0] > 0:
        return ladder[0] * ladder[0] / ladder[1]  # the same ratio as the first step
    return ladder[0] - (ladder[1] - ladder[0])


def _log(v: float, axis: str) -> float:
    """Edges on a multiplicative ladder are compared in log10; others as they are."""
    return math.log10(v) if v > 0 else v


def recipe_table(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    """Per recipe x regime: max stable rung over all seeds, LR sensitivity mean and t CI over
    seeds, best loss, failed / clean runs."""
    ps = per_seed(runs, lay)
    if ps.empty:
        return ps
    df = annotate(runs, lay)
    rows = []
    for (recipe, regime), g in ps.groupby(["recipe", "regime"], sort=False):
        runs_rr = df[(df.recipe == recipe) & (df.regime == regime)]
        by_rung = runs_rr.groupby(lay.axis)["stable"].all()
        ms = max_stable(by_rung.index.tolist(), by_rung.tolist())
        lrs = g["lr_sensitivity"].to_numpy(float)
        lo, hi = t_interval(lrs[np.isfinite(lrs)])
        rows.append({"recipe": recipe, "regime": regime,
                     f"max_stable_{lay.axis}": ms,
                     "lr_sensitivity": float(np.nanmean(lrs)) if np.isfinite(lrs).any() else math.nan,
                     "lrs_low": lo, "lrs_high": hi,
                     "best_loss": float(g["best_loss"].min()),
                     "failed": f"{int((~runs_rr['stable']).sum())}/{len(runs_rr)}",
                     "clean": f"{int(runs_rr['clean'].sum())}/{len(runs_rr)}",
                     "seeds": len(g)})
    return pd.DataFrame(rows)


def rung_rates(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    """Per recipe x regime x rung (x regime alone without an axis): runs, diverged, collapsed,
    and the failure rate."""
    df = annotate(runs, lay)
    g = df.groupby(["recipe", "regime"] + ([lay.axis] if lay.has_axis else []), sort=False)
    out = pd.DataFrame({"runs": g.size(),
                        "diverged": g["status"].apply(lambda s: int((s == "diverged").sum())),
                        "collapsed": g["status"].apply(lambda s: int((s == "collapsed").sum()))})
    out["fail_rate"] = (out["diverged"] + out["collapsed"]) / out["runs"]
    return out.reset_index()


def first_nonfinite(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    """Per regime x recipe (runs that went non-finite only): how many, median first step, and
    the places (module:stage) with their counts, most frequent first."""
    df = annotate(runs, lay)
    if "nonfinite_events" not in df:
        return pd.DataFrame()
    bad = df[df["nonfinite_events"].fillna(0) > 0]
    rows = []
    for (regime, recipe), g in bad.groupby(["regime", "recipe"], sort=False):
        where = g.get("first_nonfinite_where", pd.Series([""] * len(g))).fillna("")
        places = where[where != ""].value_counts()
        rows.append({"regime": regime, "recipe": recipe, "runs": f"{len(g)}/{int(((df.regime == regime) & (df.recipe == recipe)).sum())}",
                     "median_first_step": float(g["first_nonfinite_step"].median()),
                     "where": ", ".join(f"{w} ({n})" for w, n in places.items()) or "-"})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ effects
OUTCOMES = {
    # name: (per-seed column, better, description)
    "max_stable_log10": ("max_stable_log10", "higher", "log10 max stable {axis} (per seed)"),
    "lr_sensitivity": ("lr_sensitivity", "lower", "LR sensitivity (Wortsman et al. 2023)"),
    "fail_rate": ("fail_rate", "lower", "share of the ladder's runs that diverged or collapsed"),
}


def t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """t interval of the mean of d; a point where all values agree; NaN for fewer than 2 (one
    pair says nothing about the spread)."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    if se == 0:
        return m, m
    h = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    return m - h, m + h


def fix_effects(runs: pd.DataFrame, lay: StressLayout) -> pd.DataFrame:
    """Per fix x regime x outcome: the effect of turning the fix on, its 95 % t CI over seeds,
    the number of pairs and the mean of each arm. One-at-a-time studies give two contrasts per
    fix (added to the broken recipe; dropped from the fixed one); factorial studies one, paired
    by the other fixes and seed."""
    ps = per_seed(runs, lay)
    if ps.empty:
        return pd.DataFrame()
    spacing = ladder_spacing(runs, lay)
    rows = []
    has_roles = "roles" in runs and runs["roles"].fillna("").str.len().gt(0).any()
    for regime, g in ps.groupby("regime", sort=False):
        if has_roles:
            pairs = _role_pairs(g)
        else:
            pairs = _factor_pairs(g, lay)
        for fix, contrast, a, b in pairs:
            for out, (col, better, _) in OUTCOMES.items():
                j = pd.concat([a[col].rename("off"), b[col].rename("on")], axis=1,
                              join="inner").dropna()
                d = (j["on"] - j["off"]).to_numpy(float)
                effect = float(d.mean()) if len(d) else math.nan
                if out == "fail_rate":  # counts over the ladder's runs of the paired seeds
                    fails = [int(round((x["fail_rate"] * x["rungs"]).loc[j.index].sum()))
                             for x in (a, b)]
                    runs_n = [int(x["rungs"].loc[j.index].sum()) for x in (a, b)]
                    lo, hi = rate_diff_interval(fails[1], runs_n[1], fails[0], runs_n[0])
                else:
                    lo, hi = t_interval(d)
                    if out == "max_stable_log10":
                        lo, hi = lo - spacing, hi + spacing
                rows.append({"fix": fix, "contrast": contrast, "regime": regime, "outcome": out,
                             "effect": effect, "low": lo, "high": hi, "n": len(d),
                             "better": better,
                             "mean_off": float(j["off"].mean()) if len(j) else math.nan,
                             "mean_on": float(j["on"].mean()) if len(j) else math.nan})
    return pd.DataFrame(rows)


def rate_diff_interval(k_on: int, n_on: int, k_off: int, n_off: int) -> tuple[float, float]:
    """95 % interval of rate_on - rate_off: Newcombe's hybrid score (method 10 of Newcombe 1998)."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    if n_on == 0 or n_off == 0:
        return math.nan, math.nan
    lo, hi = confint_proportions_2indep(k_on, n_on, k_off, n_off, method="newcomb",
                                        compare="diff")
    return float(lo), float(hi)


def ladder_spacing(runs: pd.DataFrame, lay: StressLayout) -> float:
    """The widest step of the ladder, in the units max stable is compared in (log10 for lr)."""
    ladder = sorted(runs[lay.axis].dropna().unique())
    if len(ladder) < 2:
        return math.nan
    vals = [_log(v, lay.axis) for v in ladder]
    return float(np.max(np.diff(vals)))


def _role_pairs(g: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame, pd.DataFrame]]:
    by_role: dict[str, pd.DataFrame] = {}
    for _, r in g.iterrows():
        for role in str(r["recipe"]).split("/"):
            by_role.setdefault(role, []).append(r)
    by_role = {k: pd.DataFrame(v).set_index("seed") for k, v in by_role.items()}
    out = []
    for role in sorted(by_role):
        kind, _, name = role.partition(":")
        if kind == "add" and "broken" in by_role:
            out.append((name, "added to broken", by_role["broken"], by_role[role]))
        elif kind == "drop" and "fixed" in by_role:
            out.append((name, "dropped from fixed", by_role[role], by_role["fixed"]))
    return out


def _factor_pairs(g: pd.DataFrame, lay: StressLayout) -> list:
    out = []
    for f in lay.design:
        levels = sorted(g[f].dropna().unique())
        if len(levels) != 2:
            continue
        others = [o for o in lay.design if o != f] + ["seed"]
        a = g[g[f] == levels[0]].groupby(others).mean(numeric_only=True)
        b = g[g[f] == levels[1]].groupby(others).mean(numeric_only=True)
        contrast = "on vs off" if isinstance(levels[1], (bool, np.bool_)) else f"{levels[1]} vs {levels[0]}"
        out.append((f, contrast, a, b))
    return out


def hurts(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows where turning a fix on makes stability worse with a CI excluding zero."""
    if effects.empty:
        return effects
    worse_high = (effects.better == "lower") & (effects.low > 0)
    worse_low = (effects.better == "higher") & (effects.high < 0)
    return effects[worse_high | worse_low]


def summary_lines(effects: pd.DataFrame, lay: StressLayout) -> list[str]:
    """One line per fix x regime (its contrasts side by side) on max stable lr, for the terminal."""
    out = []
    if effects.empty:
        return out
    sub = effects[effects.outcome == "max_stable_log10"]
    for (fix, regime), g in sub.groupby(["fix", "regime"], sort=False):
        parts = [f"{r.contrast} {r.effect:+.1f} [{r.low:+.1f}, {r.high:+.1f}]"
                 for r in g.itertuples()]
        out.append(f"  {fix:<15} {regime:<20} " + "; ".join(parts))
    return out
