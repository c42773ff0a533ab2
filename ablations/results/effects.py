"""Two-level factorial designs analysed with the design's own linear model.

    fit = factorial_fit(runs, ["bias_init", "layer_norm", ...], "final_val_f1", aliases)
    fit.table   # term, aliases, effect, se, low, high, p, method (+ boot_low / boot_high)

The model: ordinary least squares (statsmodels) of the outcome on the factors coded -1 / +1
(off / on, or first / second level), with every main effect and every estimable two-factor
interaction; seeds are replicates (each seed is one complete copy of the design). An *effect* is
2 x the coefficient, the convention of the DOE textbooks (Montgomery, Box-Hunter-Hunter): the
mean outcome at + minus the mean at -, averaged over the other factors. In an orthogonal design
each effect is a contrast over all runs, so one factor's large effect is not another's noise.

95 % CIs are t intervals from the residual error, whatever the residual degrees of freedom (with
1 or 2 they are wide, and exact under normal errors; a note says so). An unreplicated design
with no residual df is judged with Lenth's (1989) pseudo standard error and the half-normal plot
of its effects (Daniel 1959). The seed-cluster bootstrap (seeds resampled with replacement, model
refitted) is shown beside the t intervals as a check only with BOOT_MIN_SEEDS or more seeds: with
3 seeds it has 10 distinct resamples and covers 75 % for a nominal 95 %, with 10 seeds 91 %, so
it is never used to make an interval.

Fractional designs estimate only what is estimable: each term is shown with its aliases (the
words of the defining relation, from the generators written on the MLflow experiment, or derived
from the runs when no generators are recorded). Of a set of aliased two-factor interactions one
term is fitted and carries the others' names.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

MIN_DF = 3  # below this, t intervals from the residual error are wide (said in a note)
# fewer seeds: the bootstrap covers too little to be shown (benchmarks/coverage.py, a replicated
# 2^3: 75 % at 3 seeds, 91 % at 10, for a nominal 95 %)
BOOT_MIN_SEEDS = 30
BOOT_RESAMPLES = 999
Word = frozenset  # a product of factors, e.g. frozenset({"bias_init", "layer_norm"})


# ------------------------------------------------------------------------------ coding
def two_level(runs: pd.DataFrame, factors: Sequence[str]) -> list[str]:
    """The factors (of those given) that take exactly two values in these runs."""
    return [f for f in factors if f in runs and runs[f].nunique(dropna=True) == 2]


def coded(runs: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """-1 / +1 coding of two-level factors: +1 = on (fixes) or the second sorted level."""
    out = {}
    for f in factors:
        levels = sorted(runs[f].dropna().unique())
        if len(levels) != 2:
            raise ValueError(f"factor {f!r} has {len(levels)} levels in these runs; the factorial "
                             f"model needs exactly 2")
        out[f] = np.where(runs[f] == levels[1], 1.0, -1.0)
    return pd.DataFrame(out, index=runs.index)


def term_name(word: Word, order: Sequence[str]) -> str:
    """'bias_init:layer_norm' in the factors' order (statsmodels' interaction notation)."""
    return ":".join(f for f in order if f in word)


# ------------------------------------------------------------------------------ aliases
@dataclass(frozen=True)
class Aliases:
    """The defining relation of a regular two-level fraction: I = +-word for each word."""

    factors: tuple[str, ...]
    words: tuple[tuple[int, Word], ...] = ()  # (sign, word); empty for a full factorial
    source: str = "full factorial: every effect estimable, none aliased"

    def of(self, word: Word, max_order: int = 99) -> list[str]:
        """The effects aliased with `word` (up to max_order factors), e.g. ['-clip_0_5:no_clamp']."""
        out = []
        for sign, w in self.words:
            other = word ^ w
            if 0 < len(other) <= max_order:
                out.append(("-" if sign < 0 else "") + term_name(other, self.factors))
        return sorted(out, key=lambda s: (s.count(":"), s))

    def estimable(self, order: int = 2) -> list[tuple[Word, list[str]]]:
        """Terms to fit, up to `order`-factor interactions, one per alias set, with their aliases.

        A lower-order term wins its alias set (a main effect aliased with an interaction is
        fitted as the main effect, named with its alias)."""
        seen: set[Word] = set()
        out = []
        for r in range(1, order + 1):
            for combo in itertools.combinations(self.factors, r):
                w = Word(combo)
                if w in seen:
                    continue
                cls = {w} | {w ^ x for _, x in self.words}
                if any(not c for c in cls):  # aliased with the mean: not estimable at all
                    seen |= cls
                    continue
                seen |= cls
                out.append((w, self.of(w)))
        return out


_NOTE = re.compile(r"2\^\((\d+)-(\d+)\)[^:]*:\s*(?P<gens>[A-Z]=[A-Z]+(?:,\s*[A-Z]=[A-Z]+)*)\s*"
                   r"\((?P<names>[^)]*)\)")


def aliases_from_note(note: str, factors: Sequence[str]) -> Optional[Aliases]:
    """Read the generators written on the MLflow experiment by `launch.launch`, e.g.
    'Design: 2^(5-1) resolution V: E=ABCD (A=bias_init, B=no_clamp, ...)'. None if absent."""
    m = _NOTE.search(note or "")
    if not m:
        return None
    letters = dict(p.strip().split("=", 1) for p in m["names"].split(","))
    gens = [g.strip().split("=", 1) for g in m["gens"].split(",")]
    words = [Word([letters[new]] + [letters[x] for x in word]) for new, word in gens]
    relation = set()
    for r in range(1, len(words) + 1):
        for combo in itertools.combinations(words, r):
            w = Word()
            for x in combo:
                w = w ^ x
            relation.add((1, w))
    text = ", ".join(f"{new}={word}" for new, word in gens)
    order = tuple(f for f in factors if f in letters.values()) or tuple(letters.values())
    return Aliases(order, tuple(sorted(relation, key=lambda sw: (len(sw[1]), sorted(sw[1])))),
                   f"generators on the MLflow experiment: {text} "
                   f"({', '.join(f'{k}={v}' for k, v in letters.items())})")


def aliases_from_runs(runs: pd.DataFrame, factors: Sequence[str]) -> Aliases:
    """The defining relation read off the runs: every product of factors that is constant
    (+1 or -1) over the runs is a word. Used when no generators were recorded."""
    x = coded(runs, factors)
    words = []
    for r in range(1, len(factors) + 1):
        for combo in itertools.combinations(factors, r):
            prod = x[list(combo)].prod(axis=1).to_numpy()
            if len(prod) and np.all(prod == prod[0]):
                words.append((int(prod[0]), Word(combo)))
    if not words:
        return Aliases(tuple(factors))
    rel = ", ".join(("I = -" if s < 0 else "I = ") + term_name(w, factors).replace(":", "*")
                    for s, w in words)
    return Aliases(tuple(factors), tuple(words), f"derived from the runs: {rel}")


# ------------------------------------------------------------------------------ the fit
@dataclass
class FactorialFit:
    outcome: str
    factors: list[str]
    table: pd.DataFrame  # one row per fitted term (intercept excluded)
    n: int  # runs used (finite outcome)
    df_resid: int
    sigma: float  # residual standard deviation (nan with no residual df)
    r2: float
    method: str  # how the CIs were made: "t (residual error)", "seed-cluster bootstrap", "Lenth PSE"
    result: object = None  # the statsmodels RegressionResults (for summaries, residual plots)
    data: Optional[pd.DataFrame] = None  # coded design + outcome + seed, as fitted
    dropped: int = 0  # runs left out (outcome not measurable)
    notes: list[str] = field(default_factory=list)


def _design_matrix(x: pd.DataFrame, terms: list[Word], order: Sequence[str]) -> pd.DataFrame:
    a = x.to_numpy()
    col = {f: i for i, f in enumerate(x.columns)}
    cols = {"Intercept": np.ones(len(x))}
    for w in terms:
        cols[term_name(w, order)] = np.prod(a[:, [col[f] for f in order if f in w]], axis=1)
    return pd.DataFrame(cols, index=x.index)


def factorial_fit(runs: pd.DataFrame, factors: Sequence[str], outcome: str,
                  aliases: Optional[Aliases] = None, terms: Optional[Sequence[str]] = None,
                  bootstrap: bool = True, seed: int = 0) -> FactorialFit:
    """OLS of `outcome` on the -1/+1 coded two-level `factors` (see the module docstring).

    `terms` (e.g. ["A", "C", "A:C"]) fits that model instead of main effects + estimable
    two-factor interactions. Runs whose outcome is not finite are left out (`dropped`).
    """
    import statsmodels.api as sm

    factors = list(factors)
    ok = np.isfinite(runs[outcome].to_numpy(float))
    used = runs[ok]
    x = coded(used, factors)
    if terms is not None:
        fit_terms = [Word(t.split(":")) for t in terms]
        alias_of = {w: (aliases.of(w) if aliases else []) for w in fit_terms}
    else:
        aliases = aliases or Aliases(tuple(factors))
        est = aliases.estimable(2)
        fit_terms = [w for w, _ in est]
        alias_of = dict(est)
    notes: list[str] = []
    X = _design_matrix(x, fit_terms, factors)
    # Missing runs can make the design singular: drop the highest-order terms that are not
    # estimable from the runs there are, and say so.
    while np.linalg.matrix_rank(X.to_numpy()) < X.shape[1]:
        last = X.columns[-1]
        notes.append(f"{last} not estimable from these runs (runs missing); left out")
        X = X.drop(columns=last)
        fit_terms = fit_terms[:-1]
    y = used[outcome].to_numpy(float)
    res = sm.OLS(y, X).fit()
    df_resid = int(round(res.df_resid))
    names = list(X.columns[1:])
    effect = 2 * res.params.iloc[1:].to_numpy()
    table = pd.DataFrame({"term": names,
                          "aliases": [", ".join(alias_of.get(w, [])) for w in fit_terms],
                          "effect": effect})
    seeds = used["seed"].to_numpy() if "seed" in used else np.zeros(len(used))
    n_seeds = len(np.unique(seeds))
    boot = (_seed_bootstrap(y, X, seeds, seed) if bootstrap and n_seeds >= BOOT_MIN_SEEDS
            else None)
    if boot is not None:
        table["boot_low"], table["boot_high"] = boot[0], boot[1]
    if df_resid >= 1:
        method = "t (residual error)"
        table["se"] = 2 * res.bse.iloc[1:].to_numpy()
        ci = 2 * res.conf_int(0.05).iloc[1:].to_numpy()
        table["low"], table["high"] = ci[:, 0], ci[:, 1]
        table["p"] = res.pvalues.iloc[1:].to_numpy()
        sigma = float(np.sqrt(res.scale))
        if df_resid < MIN_DF:
            notes.append(f"only {df_resid} residual df: the t intervals are wide (exact under "
                         f"normal errors; more seeds narrow them)")
    else:
        pse, me, df_l = lenth(effect)
        method = "Lenth PSE"
        table["se"] = pse
        table["low"], table["high"] = effect - me, effect + me
        table["p"] = [2 * stats.t.sf(abs(e) / pse, df_l) if pse > 0 else math.nan for e in effect]
        sigma = math.nan
        notes.append(f"{df_resid} residual df and {n_seeds} seed(s): margins from Lenth's pseudo "
                     f"standard error (PSE {pse:.4g}, t with {df_l:g} df); read the half-normal "
                     f"plot")
    data = x.assign(**{outcome: y, "seed": seeds})
    cols = ["term", "aliases", "effect", "se", "low", "high", "p"] + \
        (["boot_low", "boot_high"] if boot is not None else [])
    return FactorialFit(outcome, factors, table[cols], len(used), df_resid, sigma,
                        float(res.rsquared) if df_resid > 0 else math.nan, method, res, data,
                        int((~ok).sum()), notes)


def _seed_bootstrap(y: np.ndarray, X: pd.DataFrame, seeds: np.ndarray, seed: int
                    ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Percentile CIs, p-values (dual to the percentile CI) and SDs of the effects when whole
    seeds (replicates of the design) are resampled with replacement and the model refitted."""
    import statsmodels.api as sm

    rng = np.random.default_rng(seed)
    levels = np.unique(seeds)
    rows = [np.flatnonzero(seeds == s) for s in levels]
    Xa = X.to_numpy()
    draws = []
    cache: dict[tuple, Optional[np.ndarray]] = {}  # few seeds: few distinct resamples
    for _ in range(BOOT_RESAMPLES):
        pick = tuple(sorted(rng.integers(0, len(levels), len(levels))))
        if pick not in cache:
            idx = np.concatenate([rows[i] for i in pick])
            Xb = Xa[idx]
            # a resample that loses a level cannot estimate every term: skipped
            cache[pick] = (2 * sm.OLS(y[idx], Xb).fit().params[1:]
                           if np.linalg.matrix_rank(Xb) == Xa.shape[1] else None)
        if cache[pick] is not None:
            draws.append(cache[pick])
    if len(draws) < 50:
        return None
    d = np.array(draws)
    low, high = np.percentile(d, [2.5, 97.5], axis=0)
    p = np.minimum(1.0, 2 * np.minimum((d <= 0).mean(axis=0), (d >= 0).mean(axis=0)))
    return low, high, p, d.std(axis=0, ddof=1)


def lenth(effects: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """Lenth (1989), 'Quick and easy analysis of unreplicated factorials', Technometrics 31:
    PSE = 1.5 * median(|c| : |c| < 2.5 s0), s0 = 1.5 * median|c|; margin of error
    ME = t(1 - alpha/2, m/3) * PSE. Returns (PSE, ME, df)."""
    c = np.abs(np.asarray(effects, float))
    m = len(c)
    if m == 0:
        return math.nan, math.nan, math.nan
    s0 = 1.5 * np.median(c)
    kept = c[c < 2.5 * s0]
    pse = 1.5 * float(np.median(kept)) if len(kept) else math.nan
    df = m / 3
    return pse, float(stats.t.ppf(1 - alpha / 2, df) * pse), df


def half_normal(effects: pd.Series) -> pd.DataFrame:
    """Daniel's half-normal plot data: |effect| sorted against half-normal quantiles
    Phi^-1(0.5 + 0.5 (i - 0.5) / m)."""
    e = effects.abs().sort_values()
    m = len(e)
    q = stats.norm.ppf(0.5 + 0.5 * (np.arange(1, m + 1) - 0.5) / m)
    return pd.DataFrame({"term": e.index, "abs_effect": e.to_numpy(), "quantile": q})


def describe(fit: FactorialFit) -> str:
    """One line: the model, its size and residual error."""
    return (f"{fit.outcome}: OLS on -1/+1 coded factors, {len(fit.table)} terms, {fit.n} runs"
            + (f" ({fit.dropped} left out: not measurable)" if fit.dropped else "")
            + f", {fit.df_resid} residual df"
            + (f", residual sd {fit.sigma:.4f}, R^2 {fit.r2:.3f}" if math.isfinite(fit.sigma) else "")
            + f"; CIs: {fit.method}")


# ------------------------------------------------------------------------------ a whole study
CONTINUOUS = ("final_val_f1", "best_val_f1", "final_val_loss", "max_grad_norm")


@dataclass
class DesignEffects:
    """Everything a factorial study's report shows: the fits, an effects table in the columns
    of `analysis.main_effects` (model effects for continuous outcomes, score intervals for
    rates), two-factor interactions and the alias structure."""

    effects: pd.DataFrame
    interactions: pd.DataFrame
    fits: dict[str, FactorialFit]
    aliases: Aliases


def check_aliases(aliases: Aliases, runs: pd.DataFrame) -> Optional[str]:
    """None if every word of the defining relation is constant over the runs, else why not."""
    x = coded(runs, aliases.factors)
    for sign, w in aliases.words:
        prod = x[[f for f in aliases.factors if f in w]].prod(axis=1).to_numpy()
        if not np.all(prod == sign):
            return f"the runs do not follow I = {term_name(w, aliases.factors)}"
    return None


def factorial_effects(runs: pd.DataFrame, factors: Sequence[str], note: str = "",
                      outcomes: Sequence[str] = CONTINUOUS) -> DesignEffects:
    """Fit the factorial model to each continuous outcome and the rate intervals to each rate.

    `factors`: the two-level factors to analyse (the caller leaves out e.g. stress factors, or
    passes one stress rung's runs). `note`: the MLflow experiment's description, where
    launch.launch writes a fraction's generators."""
    from ablations.results import rates

    factors = list(factors)
    aliases = aliases_from_note(note, factors)
    if aliases is not None and (set(aliases.factors) != set(factors) or check_aliases(aliases, runs)):
        aliases = None  # recorded generators do not describe these runs: read the runs instead
    aliases = aliases or aliases_from_runs(runs, factors)
    def modelable(o: str) -> bool:
        """Finite in 2+ runs, and every factor still two-level among them (a loss is not
        measured where every run of one level diverged: no model of it)."""
        if o not in runs:
            return False
        finite = runs[np.isfinite(runs[o].to_numpy(float))]
        return len(finite) > 1 and two_level(finite, factors) == factors

    fits = {o: factorial_fit(runs, factors, o, aliases, bootstrap=o == "final_val_f1")
            for o in outcomes if modelable(o)}
    rows = []
    for o, fit in fits.items():
        used = fit.data
        for r in fit.table.itertuples():
            if ":" in r.term:
                continue
            levels = sorted(runs[r.term].dropna().unique())
            rows.append({"factor": r.term, "contrast": "on vs off" if isinstance(
                levels[1], (bool, np.bool_)) else f"{levels[1]} vs {levels[0]}",
                "outcome": o, "effect": r.effect, "low": r.low, "high": r.high, "n": fit.n,
                "paired": False, "dropped": fit.dropped,
                "mean_off": float(used.loc[used[r.term] < 0, o].mean()),
                "mean_on": float(used.loc[used[r.term] > 0, o].mean()),
                "p": r.p, "method": f"OLS effect, {fit.method}", "aliases": r.aliases})
    eff = pd.concat([pd.DataFrame(rows), rates.rate_table(runs, factors)], ignore_index=True)
    inter = pd.DataFrame()
    if "final_val_f1" in fits:
        t = fits["final_val_f1"].table
        t = t[t.term.str.contains(":")]
        inter = pd.DataFrame({"a": [x.split(":")[0] for x in t.term],
                              "b": [x.split(":")[1] for x in t.term],
                              "outcome": "final_val_f1", "effect": t.effect, "low": t.low,
                              "high": t.high, "p": t.p, "aliases": t.aliases,
                              "n": fits["final_val_f1"].n})
    return DesignEffects(eff, inter.reset_index(drop=True), fits, aliases)
