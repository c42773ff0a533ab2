"""Measure what each fix did, with confidence intervals, on runs read back from MLflow.

    runs = load_runs("quick", "sqlite:///mlflow.db")          # one row per run
    curves = load_curves("quick", ["train/loss"], "sqlite:///mlflow.db")   # long format
    effects = main_effects(runs, factor_names(runs))

How runs are counted
  * one row per run_key (cell x seed): crashed and interrupted attempts (MLflow status FAILED /
    KILLED) are excluded, and if a run was ever recorded twice only the latest FINISHED one counts;
  * diverged and collapsed runs stay in every table: divergence and collapse are outcomes (rates);
  * F1 of a diverged run counts as 0: its model outputs NaN and predicts no chorus frame.
    `final_val_loss` and `max_grad_norm` of a diverged run are not measurable: those effects are
    computed over the pairs where both runs are finite, and the number left out is reported;
  * `first_nonfinite_step` of a run that never went non-finite is censored at its step count.

Effects here (on minus off, or level minus the first level of a field factor) are paired: each
run is matched with the run that differs only in that factor (same other factors, same seed).
Where the design has no such partner, the effect is the difference of the two arms' means. 95 %
CIs are t intervals: over the pairs (Welch's for unpaired arms). A bootstrap is not used: over 3
paired differences a BCa bootstrap covers 69 % for a nominal 95 %, over 6 pairs 88 %, where the
t interval keeps its level (benchmarks/coverage.py). One-at-a-time designs are analysed per
background (ablations.results.backgrounds: the fix added to the broken recipe, and dropped from the fixed
one, never pooled); factorial designs with their own linear model (ablations.results.effects); rates
with score intervals (ablations.results.rates); verdicts follow ablations.results.verdicts.RULE.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ablations.design.fixes import FIXES, Fix
from ablations.results import backgrounds, rates
from ablations.results.verdicts import ALPHA, ClaimEstimate, judge
from ablations.tracking import reads
from ablations.tracking.reads import experiment_tags, load_crashed, study_stress  # noqa: F401
from model.config import ConfigError
from model.recipe import Recipe, load as load_recipe

OUTCOMES = {
    # name: (column, better, description)
    "diverged": ("diverged", "lower", "divergence rate"),
    "collapsed": ("collapsed", "lower", "collapse rate"),
    "final_val_f1": ("final_val_f1", "higher", "final val/chorus_f1 (diverged = 0)"),
    "best_val_f1": ("best_val_f1", "higher", "best val/chorus_f1 (diverged = 0 if never validated)"),
    "final_val_loss": ("final_val_loss", "lower", "final val/loss (finite runs)"),
    "max_grad_norm": ("max_grad_norm", "lower", "max pre-clip grad norm (finite runs)"),
    "first_nonfinite_step": ("first_nonfinite_step", "higher",
                             "first non-finite step (never = censored at the run's steps)"),
}
RUN_COLUMNS = ["run_id", "run_key", "cell", "cell_id", "seed", "status", "roles", "start_time"]


# ------------------------------------------------------------------------------ loading
# (MLflow is read in ablations.tracking.reads; these are re-exported for notebooks)
def load_runs(study: str, tracking_uri: Optional[str] = None,
              plan: Optional[Iterable[tuple[str, int]]] = None) -> pd.DataFrame:
    """One row per run of the study (ablations.tracking.reads.finished_runs says which runs
    count; `plan`: only the runs of the current study file), with the analysed outcome columns
    (see `prepare` and the module docstring)."""
    df = reads.finished_runs(study, tracking_uri, plan)
    # (a study with no finished run at all has no columns to derive from)
    return prepare(df).reset_index(drop=True) if len(df.columns) else df


def plan_cells(spec_path: str) -> Optional[list[tuple[str, int]]]:
    """(cell label, seed) of every run of a study file; None for search designs (keep all runs)."""
    from ablations.design import designs
    from ablations.design.spec import load_spec

    spec = load_spec(spec_path)
    if spec.design == "search":
        return None
    return [(r.cell.label(spec.factors), r.seed) for r in designs.runs(spec)]


def study_recipe(tags: Mapping[str, str]) -> Optional[Recipe]:
    """The recipe a study ran (experiment tag `study.recipe`, written at launch; a file path is
    relative to the study file, `study.source`); None for a study from before recipes (the
    chorus CNN) or a recipe that cannot be loaded here."""
    ref = tags.get("study.recipe")
    if not ref:
        return None
    try:
        return load_recipe(ref, Path(tags.get("study.source", ".")).parent)
    except ConfigError:
        return None


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Derive the analysed outcome columns from raw outcome metrics (also used on synthetic tables)."""
    df = df.copy()
    for col in ("final_val_f1", "best_val_f1", "final_val_loss", "max_grad_norm", "steps",
                "first_nonfinite_step"):
        if col not in df:
            df[col] = np.nan
    df["diverged"] = (df["status"] == "diverged").astype(float)
    df["collapsed"] = (df["status"] == "collapsed").astype(float)
    div = df["status"] == "diverged"
    df.loc[div, "final_val_f1"] = 0.0
    df["best_val_f1"] = df["best_val_f1"].fillna(0.0)
    df.loc[div, ["final_val_loss"]] = np.nan
    never = df["first_nonfinite_step"].isna()
    df.loc[never, "first_nonfinite_step"] = df.loc[never, "steps"]
    return df


def factor_names(runs: pd.DataFrame) -> list[str]:
    """Factors of the study, read off the cell labels (in their order)."""
    names: list[str] = []
    for cell in runs["cell"].unique() if len(runs) else []:
        for part in cell.split():
            k = part.partition("=")[0]
            if k not in names:
                names.append(k)
    return names


def load_curves(study: str, metrics: Iterable[str], tracking_uri: Optional[str] = None,
                runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Long format (run_id, step, metric, value) joined with each run's cell, seed, status and
    factors."""
    runs = load_runs(study, tracking_uri) if runs is None else runs
    curves = reads.curve_rows(tracking_uri, runs["run_id"] if len(runs) else [], metrics)
    if not len(runs):
        return curves
    keep = ["run_id", "cell", "seed", "status", "first_nonfinite_step"] + factor_names(runs)
    return curves.merge(runs[[k for k in keep if k in runs]], on="run_id", how="left")


# ------------------------------------------------------------------------------ effects
@dataclass(frozen=True)
class EffectInterval:
    effect: float
    low: float
    high: float
    n: int  # pairs (paired) or runs (unpaired)
    paired: bool
    dropped: int = 0  # pairs / runs left out because the outcome was not measurable

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def t_mean(x: np.ndarray) -> tuple[float, float]:
    """95 % t interval of the mean of x (paired differences); NaN where it cannot be made (one
    value, or every value equal: see backgrounds.paired_t)."""
    m = backgrounds.paired_t(x)
    return m.low, m.high


def t_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """95 % Welch t interval of mean(b) - mean(a) for independent samples."""
    m = backgrounds.welch(b, a)
    return m.low, m.high


def _levels(runs: pd.DataFrame, factor: str) -> list:
    vals = [v for v in runs[factor].dropna().unique()]
    if all(isinstance(v, (bool, np.bool_)) for v in vals):
        return sorted(vals)  # off (False) first
    return sorted(vals)


def paired_effect(runs: pd.DataFrame, factor: str, ref, level, outcome: str,
                  others: list[str]) -> EffectInterval:
    """Effect of `factor` going ref -> level on `outcome`: paired where partners exist (two or
    more: then only the pairs count; in a one-at-a-time design the unpaired runs differ in other
    fixes too, and pooling them would measure broken-side vs fixed-side recipes)."""
    keys = others + ["seed"]
    # Mean over duplicates: with a subset of the factors as keys, a key can hold several runs.
    a = runs[runs[factor] == ref].groupby(keys)[outcome].mean()
    b = runs[runs[factor] == level].groupby(keys)[outcome].mean()
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    if len(joined) >= 2:
        finite = joined.dropna()
        d = (finite["b"] - finite["a"]).to_numpy()
        lo, hi = t_mean(d)
        return EffectInterval(float(d.mean()) if len(d) else math.nan, lo, hi, len(d), True,
                              len(joined) - len(finite))
    fa, fb = a.dropna().to_numpy(), b.dropna().to_numpy()
    lo, hi = t_diff(fa, fb)
    eff = float(fb.mean() - fa.mean()) if len(fa) and len(fb) else math.nan
    return EffectInterval(eff, lo, hi, len(fa) + len(fb), False,
                          len(a) + len(b) - len(fa) - len(fb))


def main_effects(runs: pd.DataFrame, factors: list[str],
                 outcomes: Iterable[str] = tuple(OUTCOMES)) -> pd.DataFrame:
    """One row per factor x level x outcome: effect, CI, n, paired, dropped."""
    rows = []
    for f in factors:
        levels = _levels(runs, f)
        if len(levels) < 2:
            continue
        others = [g for g in factors if g != f]
        for level in levels[1:]:
            for out in outcomes:
                est = paired_effect(runs, f, levels[0], level, OUTCOMES[out][0], others)
                rows.append({"factor": f, "contrast": _contrast(f, levels[0], level),
                             "outcome": out, **est.__dict__,
                             "mean_off": float(runs.loc[runs[f] == levels[0], OUTCOMES[out][0]].mean()),
                             "mean_on": float(runs.loc[runs[f] == level, OUTCOMES[out][0]].mean())})
    return pd.DataFrame(rows)


def _contrast(f: str, ref, level) -> str:
    if isinstance(level, (bool, np.bool_)):
        return "on vs off"
    return f"{level:g} vs {ref:g}" if isinstance(level, float) else f"{level} vs {ref}"


def interactions(runs: pd.DataFrame, factors: list[str], outcome: str = "final_val_f1") -> pd.DataFrame:
    """Two-factor interactions of two-level factors: AB = mean(y | a*b = +1) - mean(y | a*b = -1),
    i.e. half of (effect of A with B on) minus (effect of A with B off). Paired by the remaining
    factors and seed where complete 2x2 blocks exist (full factorials); else over runs."""
    two = [f for f in factors if len(_levels(runs, f)) == 2]
    rows = []
    col = OUTCOMES[outcome][0]
    for i, a in enumerate(two):
        for b in two[i + 1:]:
            la, lb = _levels(runs, a), _levels(runs, b)
            sa = np.where(runs[a] == la[1], 1, -1)
            sb = np.where(runs[b] == lb[1], 1, -1)
            y = runs[col].to_numpy(float)
            ok = np.isfinite(y)
            keys = [g for g in factors if g not in (a, b)] + ["seed"]
            block = runs[keys].astype(str).agg("|".join, axis=1).to_numpy()
            df = pd.DataFrame({"block": block, "s": sa * sb, "y": y})[ok]
            counts = df.groupby("block").size()
            if len(counts) and (counts == 4).all():
                per_block = df.groupby("block").apply(
                    lambda g: g.loc[g.s > 0, "y"].mean() - g.loc[g.s < 0, "y"].mean(),
                    include_groups=False).to_numpy()
                lo, hi = t_mean(per_block)
                est = EffectInterval(float(per_block.mean()), lo, hi, len(per_block), True,
                                     int((~ok).sum()))
            else:
                pos, neg = df.loc[df.s > 0, "y"].to_numpy(), df.loc[df.s < 0, "y"].to_numpy()
                lo, hi = t_diff(neg, pos)
                diff = float(pos.mean() - neg.mean()) if len(pos) and len(neg) else math.nan
                est = EffectInterval(diff, lo, hi, len(df), False, int((~ok).sum()))
            rows.append({"a": a, "b": b, "outcome": outcome, **est.__dict__})
    return pd.DataFrame(rows)


def one_at_a_time(runs: pd.DataFrame, outcome: str = "final_val_f1",
                  stress: Sequence[str] = ()) -> pd.DataFrame:
    """One row per fix x background x regime: the fix added to the broken recipe (add:X minus
    broken) and dropped from the fixed one (fixed minus drop:X), paired by seed *and* stress cell;
    with an lr axis, each seed's differences are averaged over the rungs both runs have (the
    `rungs` column says which), then a t interval over seeds. `backgrounds` says whether the two
    backgrounds agree (ablations.results.backgrounds.agreement)."""
    from ablations.results import stability

    design = [f for f in factor_names(runs) if f in runs and f not in stress]
    lay = stability.layout(runs, design + list(stress), stress) if stress else None
    axis = lay.axis if lay is not None else None
    t = backgrounds.continuous(runs, design, [s for s in stress if s in runs],
                               OUTCOMES[outcome][0], axis)
    return backgrounds.public(t)


def ablation_path(runs: pd.DataFrame, factors: list[str],
                  outcome: str = "final_val_f1") -> pd.DataFrame:
    """Greedy path from all-off to all-on (Fawcett & Hoos 2016) over the cells that exist: at each
    step flip the factor whose flip gives the best mean outcome; stop where no next cell exists."""
    col = OUTCOMES[outcome][0]
    better_high = OUTCOMES[outcome][1] == "higher"
    two = [f for f in factors if len(_levels(runs, f)) == 2]
    if not two:
        return pd.DataFrame()
    lv = {f: _levels(runs, f) for f in two}
    means = runs.groupby([runs[f].astype(str) for f in two])[col].mean()
    n_runs = runs.groupby([runs[f].astype(str) for f in two])[col].size()
    state = {f: lv[f][0] for f in two}

    def key(s: dict) -> tuple:
        k = tuple(str(s[f]) for f in two)
        return k if len(two) > 1 else k[0]

    if key(state) not in means.index:
        return pd.DataFrame()
    rows = [{"step": 0, "flipped": "(start: all off)", "mean": float(means[key(state)]),
             "delta": 0.0, "n": int(n_runs[key(state)])}]
    remaining = list(two)
    while remaining:
        options = []
        for f in remaining:
            s = {**state, f: lv[f][1]}
            if key(s) in means.index and not math.isnan(means[key(s)]):
                options.append((means[key(s)], f, s))
        if not options:
            break
        val, f, s = max(options) if better_high else min(options)
        rows.append({"step": len(rows), "flipped": f, "mean": float(val),
                     "delta": float(val - rows[-1]["mean"]), "n": int(n_runs[key(s)])})
        state = s
        remaining.remove(f)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ verdicts
INSTABILITY = {"diverged": "divergence rate", "collapsed": "collapse rate"}


def instability_estimates(runs: pd.DataFrame, factors: list[str], fix: str,
                          regimes: Sequence[str] = ()) -> list[ClaimEstimate]:
    """The claim's evidence: divergence and collapse rate, fix on minus off, with Newcombe score
    intervals (paired where the design pairs runs). With `regimes` (stress factors such as
    precision), one estimate per regime: a fix can help in fp16 and hurt in fp32."""
    out = []
    groups = runs.groupby(list(regimes), sort=False) if regimes else [((), runs)]
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        where = (" (" + ", ".join(f"{r}={v}" for r, v in zip(regimes, key)) + ")") if regimes else ""
        for col, label in INSTABILITY.items():
            rd = rates.rate_difference(sub, fix, col, [g for g in factors if g != fix])
            out.append(ClaimEstimate(label + where, rd.diff, rd.low, rd.high, rd.p, "lower",
                                     (rd.events_on, rd.n_on, rd.events_off, rd.n_off), rd.method,
                                     pairs=rd.pairs))
    return out


def background_estimates(tests: pd.DataFrame) -> dict[str, list[ClaimEstimate]]:
    """Per fix: one estimate per row of a per-background table (backgrounds.rate_tests, or
    stability.fix_effects restricted to its verdict outcomes), named by background and regime."""
    labels = {**INSTABILITY, "edge_shift": "edge shift (log10 LR50)",
              "unstable_rate": "unstable rate"}
    out: dict[str, list[ClaimEstimate]] = {}
    pairs = tests["_pairs"].tolist() if "_pairs" in tests else [None] * len(tests)
    for r, pr in zip(tests.itertuples(), pairs):
        where = r.background + ("" if r.regime == "all" else f", {r.regime}")
        counts = None
        if isinstance(getattr(r, "counts", ""), str) and " vs " in r.counts:
            (a, n1), (b, n0) = (map(int, x.split("/")) for x in r.counts.split(" vs "))
            counts = (a, n1, b, n0)
        better = getattr(r, "better", "lower")
        out.setdefault(r.fix, []).append(ClaimEstimate(
            labels.get(r.outcome, r.outcome), r.effect, r.low, r.high, r.p, better, counts,
            getattr(r, "method", ""), where, not bool(r.untested),
            getattr(r, "shown", "") if r.outcome == "edge_shift" else "",
            pairs=tuple(int(v) for v in pr) if isinstance(pr, tuple) else None))
    return out


def claim_estimates(runs: pd.DataFrame, factors: Sequence[str], stress: Sequence[str] = (),
                    stability_effects: Optional[pd.DataFrame] = None,
                    fixes: Mapping[str, Fix] = FIXES) -> dict[str, list[ClaimEstimate]]:
    """The evidence each claim is judged on.

    One-at-a-time designs: per background and regime, never pooled. With a stress axis, the
    shift of the edge and the unstable rate (ablations.results.stability); otherwise the divergence and
    collapse rates, paired by seed and stress cell. Factorial designs: the rates as the design's
    main effect (on vs off over every other fix), per regime."""
    design = [f for f in factors if f not in stress]
    if backgrounds.has_roles(runs):
        if stability_effects is not None and not stability_effects.empty:
            from ablations.results.stability import VERDICT_OUTCOMES

            tests = stability_effects[stability_effects.outcome.isin(VERDICT_OUTCOMES)]
        else:
            from ablations.results import stability

            in_runs = [s for s in stress if s in runs]
            axis = stability.layout(runs, factors, in_runs).axis if in_runs else None
            tests = backgrounds.rate_tests(runs, design, in_runs, axis=axis)
        return {k: v for k, v in background_estimates(tests).items() if k in fixes}
    from ablations.results import stability

    regimes = stability.layout(runs, factors, stress).regime if stress else ()
    return {n: instability_estimates(runs, factors, n, regimes) for n in design
            if n in fixes and runs[n].nunique() == 2}


def verdicts(effects: pd.DataFrame, runs: pd.DataFrame,
             claims: Optional[dict[str, list[ClaimEstimate]]] = None,
             fixes: Mapping[str, Fix] = FIXES) -> pd.DataFrame:
    """Supported / refuted / background-dependent / inconclusive / untested for each seed claim
    whose fix is a factor.

    Every claim of the seed is about instability (`loss=nan`, `chorus%=0`), so it is judged on
    the estimates of `claim_estimates` by the rule in `ablations.results.verdicts.RULE` (Holm across every
    test judged here). The F1 effect is shown next to it as context, not as evidence.
    """
    columns = ["fix", "critical", "claim", "verdict", "evidence", "reason", "decisive",
               "fragility"]
    if effects.empty:
        return pd.DataFrame(columns=columns)
    claims = claims if claims is not None else claim_estimates(
        runs, [f for f in factor_names(runs) if f in runs], fixes=fixes)
    judged_fixes = [n for n in fixes if n in claims]
    judged = judge({n: claims[n] for n in judged_fixes})
    rows = []
    for name in judged_fixes:
        f1 = effects[(effects.factor == name) & (effects.outcome == "final_val_f1")]
        ctx = "; ".join(f"{r.contrast}: {_ci(r, 3)}" for r in f1.head(4).itertuples())
        if len(f1) > 4:
            ctx += f"; ... ({len(f1)} in the tables)"
        v = judged[name]
        ev = "; ".join(e.describe() for e in claims[name])
        sentence = f"{name} on vs off: {ev}; final F1 change {ctx or 'n/a'} (context)."
        decisive = [f"{e.describe()}, Holm p {p:.3g}" for e, p in zip(claims[name], v.adjusted_p)
                    if p is not None and p < ALPHA]  # the tests a verdict rests on
        rows.append({"fix": name, "critical": fixes[name].critical, "claim": fixes[name].claim,
                     "verdict": v.verdict, "evidence": sentence, "reason": v.reason,
                     "decisive": decisive, "fragility": v.fragility})
    return pd.DataFrame(rows, columns=columns)


def _ci(o, digits: int = 2) -> str:
    if o is None or (isinstance(o.effect, float) and math.isnan(o.effect)):
        return "n/a"
    if not math.isfinite(o.low):  # no interval: one pair, or every seed agreeing
        note = getattr(o, "note", "") or "no interval"
        return f"{o.effect:+.{digits}f} ({note})"
    return f"{o.effect:+.{digits}f} [95% CI {o.low:+.{digits}f}, {o.high:+.{digits}f}]"


def critical_agreement(v: pd.DataFrame) -> str:
    """Does the data agree with the seed's list of most critical fixes?"""
    crit = v[v.critical]
    if crit.empty:
        return "None of the seed's 'most critical' fixes is a factor of this study."
    parts = [f"{r.fix}: {r.verdict}" for r in crit.itertuples()]
    others = v[~v.critical & (v.verdict == "supported")]
    if all(r.verdict == "supported" for r in crit.itertuples()):
        s = "The data agrees with the seed's 'most critical' list"
    elif any(r.verdict == "refuted" for r in crit.itertuples()):
        s = "The data does not agree with the seed's 'most critical' list"
    else:  # untested or inconclusive: no contradiction shown either
        s = "The data can neither confirm nor contradict the seed's 'most critical' list"
    s += f" ({'; '.join(parts)})."
    if not others.empty:
        s += f" Fixes the seed did not rank critical but that matter here: {', '.join(others.fix)}."
    return s


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A plain Markdown table (no tabulate dependency)."""
    if df.empty:
        return "(none)"
    cols = list(df.columns)

    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def buffer_csv(df: pd.DataFrame) -> str:
    b = io.StringIO()
    df.to_csv(b, index=False)
    return b.getvalue()
