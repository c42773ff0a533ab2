"""Stability under stress: where each recipe breaks, and how far each fix moves that edge.

A study's `stress:` factors (e.g. an lr ladder, precision) are crossed with its design's cells.
Here a *recipe* is a design cell (its fix states; the one-at-a-time role names it: broken, fixed,
add:X, drop:X), a *regime* a combination of the stress factors other than the axis, and the
*axis* the ladder along which the edge is measured: `lr` when it is a stress factor, else the
first numeric one (e.g. feature_scale).

Per recipe x regime, over the axis and the seeds (`grid`: every run the study should hold; a run
that is missing, or crashed past its retries, is never counted as stable):
  * a run is *stable* when its final model is finite and not collapsed (status converged or
    recovered: a run whose non-finite steps were zeroed away and that ended finite counts, and
    `clean` says how many had no non-finite event at all);
  * the best rung: the lowest median capped final loss among the rungs where at least half the
    seeds are stable. Failures below it are *too slow* (a 20-step run at lr 1e-3 that has not
    learned yet), not unstable, and are counted apart;
  * LR50, the estimated edge: the axis value at which half the runs fail, read on the rungs at
    and above the best rung, with its profile-likelihood interval (ablations/results/edges.py: each
    seed's edge is interval-censored between its last stable rung and its first failure);
  * max stable <axis> (descriptive): the largest rung at which every seed is present and stable;
  * LR sensitivity, as defined by Wortsman et al. 2023, "Small-scale proxies for large-scale
    Transformer training instabilities" (arXiv 2309.14322), sec. 2.2:
        LRS = E_eta [ min(l(eta), l0) - l* ],   l* = min_eta l(eta)
    the mean over the rungs eta of the final loss, capped at the loss at initialisation l0, above
    the best loss of the sweep. Non-finite final losses count as l0 (the min with l0 is the
    paper's way of counting a diverged run). Here l is the final validation loss and l0 the
    validation loss of the initial model, before any update, measured per run on the same frames
    (for runs logged before it was measured: step 1's training loss; where neither is finite,
    ln 2). One departure, stated: where no rung improves on l0 (the recipe never trained) LRS is
    undefined (NaN), since the formula would give 0 and rank it the least sensitive;
  * the divergence and collapse rate per rung;
  * the step of the first non-finite value and where it happened (module:stage).
Each fix's effect is estimated per background (added to broken; dropped from fixed; or, in a
factorial study, each state of the other fixes) and per regime, never pooled:
  * the edge: the shift of log10 LR50 (+1 = ten times larger), profile likelihood, censored
    sides printed as bounds;
  * the unstable rate: runs that diverged or collapsed at and above the best rung of both
    recipes, paired by seed and rung, Newcombe's paired score interval;
  * LR sensitivity over the rungs both recipes ran, paired by seed: a t interval, or "all seeds
    agree" where they tie (never a zero-width interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ablations.results import backgrounds as bg
from ablations.results import edges, rates

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


def init_losses(df: pd.DataFrame) -> pd.Series:
    """l0 per run: the validation loss of the initial model (init_val_loss), before any update;
    for runs logged before that was measured, step 1's training loss (init_loss); else ln 2."""
    l0 = pd.Series(np.nan, index=df.index)
    for col in ("init_val_loss", "init_loss"):
        if col in df:
            v = pd.to_numeric(df[col], errors="coerce")
            l0 = l0.where(np.isfinite(l0), v.where(np.isfinite(v)))
    return l0.fillna(LN2)


def capped_loss(df: pd.DataFrame) -> pd.Series:
    """min(final val loss, l0), non-finite losses counted as l0: what LR sensitivity averages."""
    l0 = init_losses(df)
    loss = pd.to_numeric(df["final_val_loss"], errors="coerce")
    return np.minimum(loss.where(np.isfinite(loss), l0), l0)


def grid(runs: pd.DataFrame, lay: StressLayout,
         crashed: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Every run the study should hold: recipe x regime x rung x seed (the full cross of what is
    there), with `present`, `crashed` (an attempt failed past its retries) and, where present,
    `stable` and the capped loss. A run that is not present is never counted as stable."""
    df = annotate(runs, lay).assign(capped=lambda d: capped_loss(d), l0=lambda d: init_losses(d))
    keys = ["recipe", "regime", lay.axis, "seed"]
    pairs = df[["recipe", "regime"]].drop_duplicates()
    rungs = sorted(df[lay.axis].dropna().unique())
    seeds = sorted(df["seed"].unique())
    full = pairs.merge(pd.DataFrame({lay.axis: rungs}), how="cross").merge(
        pd.DataFrame({"seed": seeds}), how="cross")
    cols = keys + ["stable", "capped", "l0", "status", "final_val_loss"] + curve_peaks(df)
    out = full.merge(df[cols].drop_duplicates(keys), on=keys, how="left", indicator=True)
    out["present"] = out.pop("_merge") == "both"
    out["crashed"] = False
    if crashed is not None and len(crashed):
        c = annotate(crashed.assign(status="crashed"), lay)[keys].drop_duplicates()
        hit = out.merge(c.assign(_c=True), on=keys, how="left")["_c"].fillna(False).to_numpy(bool)
        out["crashed"] = hit & ~out["present"].to_numpy()
    return out


def best_rung(g: pd.DataFrame, axis: str) -> float:
    """The rung a recipe trains best at: lowest median capped loss among the rungs where at least
    half the seeds present are stable (NaN where there is none: stable nowhere)."""
    p = g[g.present]
    by = p.groupby(axis).agg(ok=("stable", "mean"), loss=("capped", "median"))
    by = by[by.ok >= 0.5]
    if by.empty:
        return math.nan
    return float(by["loss"].idxmin())


def seed_edges(g: pd.DataFrame, axis: str, start: float) -> list[edges.Interval]:
    """Per seed of one recipe x regime: the interval its upper edge lies in (axis units: log10
    for a multiplicative ladder), read from `start` up; missing runs say nothing."""
    out = []
    for _, s in g.groupby("seed", sort=True):
        xs = [_log(v, axis) for v in s[axis]]
        st = [bool(v) if p else None for v, p in zip(s["stable"], s["present"])]
        if math.isnan(start):  # stable at no rung: the edge lies below the ladder
            out.append(edges.Interval(-math.inf, min(xs)))
        else:
            out.append(edges.seed_interval(xs, st, _log(start, axis)))
    return out


def per_seed(runs: pd.DataFrame, lay: StressLayout,
             crashed: Optional[pd.DataFrame] = None,
             gr: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per recipe x regime x seed: max stable rung (descriptive), the edge interval,
    LR sensitivity over the rungs present and the failure rate, with the design factors (`gr`:
    the `grid` of these runs, where the caller has it already)."""
    if not lay.has_axis:
        return pd.DataFrame()
    gr = grid(runs, lay, crashed) if gr is None else gr
    ann = annotate(runs, lay)
    first = ann.drop_duplicates(["recipe", "regime"]).set_index(["recipe", "regime"])
    rows = []
    for (recipe, regime), g in gr.groupby(["recipe", "regime"], sort=False):
        best = best_rung(g, lay.axis)
        ivs = seed_edges(g, lay.axis, best)
        for (seed, s), iv in zip(g.groupby("seed", sort=True), ivs):
            s = s.sort_values(lay.axis)
            p = s[s.present]
            ms = max_stable(s[lay.axis].tolist(), [bool(v) and q for v, q in
                                                   zip(s["stable"].fillna(False), s["present"])])
            l0 = float(p["l0"].median()) if len(p) else LN2
            row = {"recipe": recipe, "regime": regime, "seed": seed, "max_stable": ms,
                   "best_rung": best, "edge_low": iv.low, "edge_high": iv.high,
                   "lr_sensitivity": lr_sensitivity(p["final_val_loss"].tolist(), l0),
                   "best_loss": float(p["capped"].min()) if len(p) else math.nan,
                   "init_loss": l0,
                   "fail_rate": float(1.0 - p["stable"].astype(bool).mean()) if len(p) else math.nan,
                   "rungs": len(p), "expected": len(s), "crashed": int(s["crashed"].sum())}
            for f in lay.design + lay.regime:
                row[f] = first.loc[(recipe, regime), f] if f in first else None
            rows.append(row)
    return pd.DataFrame(rows)


def _log(v: float, axis: str) -> float:
    """Edges on a multiplicative ladder are compared in log10; others as they are."""
    return math.log10(v) if v > 0 else v


def _is_log(runs: pd.DataFrame, lay: StressLayout) -> bool:
    return bool((runs[lay.axis].dropna() > 0).all())


def ladder_of(runs: pd.DataFrame, lay: StressLayout) -> list[float]:
    return [_log(v, lay.axis) for v in sorted(runs[lay.axis].dropna().unique())]


def count_text(present: int, expected: int, crashed: int) -> str:
    """'15 of 15 runs', or '14 of 15 runs (1 crashed)'."""
    extra = []
    if crashed:
        extra.append(f"{crashed} crashed")
    if expected - present - crashed:
        extra.append(f"{expected - present - crashed} missing")
    return f"{present} of {expected}" + (f" ({', '.join(extra)})" if extra else "")


def recipe_table(runs: pd.DataFrame, lay: StressLayout,
                 crashed: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per recipe x regime: runs (k of n), the rung it trains best at, max stable rung
    (descriptive: the largest rung at which every seed is stable), LR50 with its interval
    (the estimated edge), failures below the best rung (too slow, not unstable), LR sensitivity
    with its t interval over seeds, failed and clean runs."""
    if not lay.has_axis:
        return pd.DataFrame()
    gr = grid(runs, lay, crashed)
    ps = per_seed(runs, lay, crashed, gr)
    clean = annotate(runs, lay).groupby(["recipe", "regime"])["clean"].sum()
    ladder = ladder_of(runs, lay)
    log = _is_log(runs, lay)
    rows = []
    for (recipe, regime), g in ps.groupby(["recipe", "regime"], sort=False):
        runs_rr = gr[(gr.recipe == recipe) & (gr.regime == regime)]
        pres = runs_rr[runs_rr.present]
        by_rung = runs_rr.groupby(lay.axis).apply(
            lambda r: bool((r.present & r.stable.fillna(False).astype(bool)).all()),
            include_groups=False)
        ms = max_stable(by_rung.index.tolist(), by_rung.tolist())
        incomplete = bool((~runs_rr.present).any())
        ivs = [edges.Interval(a, b) for a, b in zip(g.edge_low, g.edge_high)]
        est = edges.lr50(ivs, ladder)
        best = float(g["best_rung"].iloc[0])
        slow = pres[pres[lay.axis] < best] if math.isfinite(best) else pres.iloc[:0]
        lrs = g["lr_sensitivity"].to_numpy(float)
        m = bg.paired_t(lrs)
        lr50_text = (edges.fmt_location(est, lay.axis, log, ladder) if math.isfinite(best)
                     else f"stable at no rung (< {_fmt(min(runs_rr[lay.axis]))})")
        rows.append({"recipe": recipe, "regime": regime,
                     "runs": count_text(len(pres), len(runs_rr), int(runs_rr.crashed.sum())),
                     f"best_{lay.axis}": best,
                     f"max_stable_{lay.axis}": ms,
                     "LR50 [95% CI]" if lay.axis == "lr" else "edge50 [95% CI]":
                         lr50_text + (" (incomplete)" if incomplete else ""),
                     "lr50_log10": est.value, "lr50_low": est.low, "lr50_high": est.high,
                     "failed_below_best": (f"{int((~slow.stable.astype(bool)).sum())}/{len(slow)}"
                                           if len(slow) else "-"),
                     "lr_sensitivity": m.effect, "lrs_low": m.low, "lrs_high": m.high,
                     "lrs_note": m.note,
                     "failed": f"{int((~pres.stable.astype(bool)).sum())}/{len(pres)}",
                     "clean": f"{int(clean.get((recipe, regime), 0))}/{len(pres)}",
                     "seeds": len(g), "incomplete": incomplete})
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
    # name: (better, description)
    "edge_shift": ("higher", "shift of log10 LR50 (+1 = a ten times larger lr before half the "
                   "runs fail), profile likelihood"),
    "unstable_rate": ("lower", "share of runs that diverged or collapsed at and above the best "
                      "rung of both recipes, paired by seed and rung (Newcombe)"),
    "lr_sensitivity": ("lower", "LR sensitivity (Wortsman et al. 2023) over the rungs both "
                       "recipes ran, paired by seed (t)"),
}
VERDICT_OUTCOMES = ("edge_shift", "unstable_rate")
# A recipe's curves (model/recipe.py), e.g. the Transformer's largest attention logit: each run's
# peak, as the log10 ratio on / off averaged over the rungs both ran, paired by seed (t).
CURVE_BETTER = "lower"


def curve_peaks(runs: pd.DataFrame) -> list[str]:
    """The recipe's curve outcomes in these runs (peak_<curve>; none for the chorus CNN)."""
    return [c for c in runs.columns if c.startswith("peak_")]


def fix_effects(runs: pd.DataFrame, lay: StressLayout,
                crashed: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per fix x background x regime: the effect of switching the fix on, on the edge (LR50
    shift), on the unstable rate and on LR sensitivity. Backgrounds: 'added to broken' and
    'dropped from fixed' in one-at-a-time studies; the other fixes' states in factorial ones."""
    if not lay.has_axis:
        return pd.DataFrame()
    gr = grid(runs, lay, crashed)
    ps = per_seed(runs, lay, crashed, gr)
    ann = annotate(runs, lay)
    ladder = ladder_of(runs, lay)
    rows = []
    for c in bg.contrasts(ann, lay.design):
        r_off, r_on = _recipe(c.off), _recipe(c.on)
        for regime in dict.fromkeys(ps.loc[ps.recipe == r_off, "regime"]):
            a = ps[(ps.recipe == r_off) & (ps.regime == regime)].set_index("seed")
            b = ps[(ps.recipe == r_on) & (ps.regime == regime)].set_index("seed")
            if a.empty or b.empty:
                continue
            base = {"fix": c.fix, "background": c.background, "regime": regime}
            rows.append({**base, **_edge_row(a, b, ladder)})
            ga = gr[(gr.recipe == r_off) & (gr.regime == regime)]
            gb = gr[(gr.recipe == r_on) & (gr.regime == regime)]
            rows.append({**base, **_unstable_row(ga, gb, a, b, lay.axis)})
            rows.append({**base, **_lrs_row(ga, gb, lay.axis)})
            rows += [{**base, **_curve_row(ga, gb, lay.axis, col)} for col in curve_peaks(gr)]
    out = pd.DataFrame(rows)
    return bg.agreement(out) if not out.empty else out


def _recipe(runs: pd.DataFrame) -> str:
    return str(runs["recipe"].iloc[0])


def _edge_row(a: pd.DataFrame, b: pd.DataFrame, ladder: list[float]) -> dict:
    ia = [edges.Interval(lo, hi) for lo, hi in zip(a.edge_low, a.edge_high)]
    ib = [edges.Interval(lo, hi) for lo, hi in zip(b.edge_low, b.edge_high)]
    est = edges.shift(ia, ib, ladder)
    span = max(ladder) - min(ladder)
    # Nothing to test when no seed of either recipe failed at or above its best rung (both
    # edges past the top), or every seed failed from the start (both below the ladder).
    above = all(math.isinf(i.high) for i in ia + ib)
    below = all(math.isinf(i.low) for i in ia + ib)
    untested = above or below or not est.measured
    note = est.note or ("no seed of either recipe failed above its best rung" if above else
                        "every seed of both failed from its first rung" if below else "")
    return {"outcome": "edge_shift", "effect": est.value, "low": est.low, "high": est.high,
            "p": est.p, "n": est.n, "shown": edges.fmt_shift(est, span), "note": note,
            "better": OUTCOMES["edge_shift"][0], "untested": untested, "counts": ""}


def _unstable_row(ga: pd.DataFrame, gb: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame,
                  axis: str) -> dict:
    starts = [v for v in (a.best_rung.iloc[0], b.best_rung.iloc[0]) if math.isfinite(v)]
    start = max(starts) if starts else -math.inf
    keys = [axis, "seed"]
    j = pd.concat([ga[ga.present & (ga[axis] >= start)].set_index(keys)["stable"].rename("off"),
                   gb[gb.present & (gb[axis] >= start)].set_index(keys)["stable"].rename("on")],
                  axis=1, join="inner").dropna()
    rd = rates.rate_diff_paired(~j["on"].astype(bool).to_numpy(), ~j["off"].astype(bool).to_numpy())
    untested = rd.untested or (rd.events_on == rd.n_on and rd.events_off == rd.n_off)
    shown = (f"{rd.diff:+.2f} [{rd.low:+.2f}, {rd.high:+.2f}]" if math.isfinite(rd.diff)
             else "n/a")
    return {"outcome": "unstable_rate", "effect": rd.diff, "low": rd.low, "high": rd.high,
            "p": rd.p, "n": len(j), "shown": shown,
            "note": f"{axis} >= {start:g}" if math.isfinite(start) else f"every {axis}",
            "better": OUTCOMES["unstable_rate"][0], "untested": untested, "counts": rd.counts(),
            "_pairs": rd.pairs}


def _lrs_row(ga: pd.DataFrame, gb: pd.DataFrame, axis: str) -> dict:
    """LR sensitivity of both recipes over the rungs both ran, per seed; t over seeds."""
    d = []
    for seed, sa in ga[ga.present].groupby("seed"):
        sb = gb[gb.present & (gb.seed == seed)]
        common = sorted(set(sa[axis]) & set(sb[axis]))
        if not common:
            continue
        xa = sa[sa[axis].isin(common)].sort_values(axis)
        xb = sb[sb[axis].isin(common)].sort_values(axis)
        d.append(lr_sensitivity(xb["final_val_loss"].tolist(), float(xb["l0"].median()))
                 - lr_sensitivity(xa["final_val_loss"].tolist(), float(xa["l0"].median())))
    m = bg.paired_t(np.asarray(d, float))
    if d and m.n == 0:
        m = bg.Mean(math.nan, math.nan, math.nan, math.nan, 0,
                    "undefined: a recipe never improved on its initial loss")
    if math.isfinite(m.low):
        shown = f"{m.effect:+.3f} [{m.low:+.3f}, {m.high:+.3f}]"
    elif math.isfinite(m.effect):
        shown = f"{m.effect:+.3f} ({m.note}: resolution one rung)"
    else:
        shown = m.note or "n/a"
    return {"outcome": "lr_sensitivity", "effect": m.effect, "low": m.low, "high": m.high,
            "p": m.p, "n": m.n, "shown": shown, "note": m.note,
            "better": OUTCOMES["lr_sensitivity"][0],
            "untested": not math.isfinite(m.p), "counts": ""}


def _curve_row(ga: pd.DataFrame, gb: pd.DataFrame, axis: str, col: str) -> dict:
    """log10(peak on / peak off) of a recipe curve, per seed the mean over the rungs where both
    runs measured it; t over seeds (-1 = ten times smaller with the fix)."""
    d = []
    for seed, sa in ga[ga.present].groupby("seed"):
        j = sa.set_index(axis)[col].rename("off").to_frame().join(
            gb[gb.present & (gb.seed == seed)].set_index(axis)[col].rename("on"), how="inner")
        j = j[(j.on > 0) & (j.off > 0)].dropna()
        if len(j):
            d.append(float(np.mean(np.log10(j.on.to_numpy(float) / j.off.to_numpy(float)))))
    m = bg.paired_t(np.asarray(d, float))
    shown = (f"{m.effect:+.2f} [{m.low:+.2f}, {m.high:+.2f}]" if math.isfinite(m.low)
             else f"{m.effect:+.2f} ({m.note})" if math.isfinite(m.effect) else m.note or "n/a")
    return {"outcome": col, "effect": m.effect, "low": m.low, "high": m.high, "p": m.p, "n": m.n,
            "shown": shown, "note": "log10 ratio on/off over the rungs both ran" + (
                f"; {m.note}" if m.note else ""),
            "better": CURVE_BETTER, "untested": not math.isfinite(m.p), "counts": ""}


def rate_diff_interval(k_on: int, n_on: int, k_off: int, n_off: int) -> tuple[float, float]:
    """95 % interval of rate_on - rate_off for independent arms: Newcombe's hybrid score
    (rates.newcombe_indep); NaN for an empty arm."""
    if n_on == 0 or n_off == 0:
        return math.nan, math.nan
    return rates.newcombe_indep(k_on, n_on, k_off, n_off)


def hurts(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows where switching a fix on makes stability worse, with an interval that excludes
    zero (rows without an interval, e.g. every seed agreeing, are never 'certain')."""
    if effects.empty:
        return effects
    lo, hi = effects["low"].astype(float), effects["high"].astype(float)
    worse_high = (effects.better == "lower") & (lo > 0)
    worse_low = (effects.better == "higher") & (hi < 0)
    return effects[worse_high | worse_low]


def summary_lines(effects: pd.DataFrame, lay: StressLayout) -> list[str]:
    """One line per fix x regime on the edge: both backgrounds side by side, for the terminal."""
    out = []
    if effects.empty:
        return out
    sub = effects[effects.outcome == "edge_shift"]
    for (fix, regime), g in sub.groupby(["fix", "regime"], sort=False):
        parts = [f"{r.background} {r.shown}" for r in g.itertuples()]
        flag = g["backgrounds"].iloc[0] if "backgrounds" in g else "-"
        out.append(f"  {fix:<15} {regime:<20} " + "; ".join(parts)
                   + (f"  [backgrounds {flag}]" if flag in ("opposite", "differ") else ""))
    return out
