"""`runner.py plan STUDY.yaml`: the design, its cost and what it can detect, before anything runs.

    design: cells, runs, aliases, the model's residual degrees of freedom
    wall time: seconds per step of recent runs of the same model size in the tracking store
    power: the smallest F1 effect detectable at 80 % power, from the seed-to-seed spread of
           earlier runs of the same recipes (else a stated default), and the seeds a target
           effect needs; the smallest rate difference the analysis's own rate test detects at
           80 % power (exact: ablations/results/rate_power.py)

The store is read by ablations.tracking.stored_runs (SQLite directly, read-only, so that this
command answers at once and never migrates a store). Nothing here imports torch or MLflow.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from ablations.design import designs
from ablations.design.spec import StudySpec
from ablations.tracking.stored_runs import StoredRun, param_str, read_runs

ALPHA, POWER = 0.05, 0.80
DEFAULT_SD = 0.03  # F1 sd between seeds assumed when the store has no earlier runs of a recipe
# Fields that set the cost of a training step (not the factors' fixes, which cost the same).
COST_FIELDS = ("data_source", "frames", "n_features", "hidden_dim", "n_blocks", "kernel_size",
               "batch_size", "device", "n_songs")
NOT_RECIPE = ("seed", "device", "cache_dir")  # differ between runs of the same recipe


# ------------------------------------------------------------------------------ estimates
def seconds_per_step(spec: StudySpec, stored: list[StoredRun], configs: list[dict]
                     ) -> Optional[tuple[float, int]]:
    """Median wall seconds per training step of up to 50 recent runs with the plan's model size
    (COST_FIELDS) that ran all their steps; (seconds, runs used) or None."""
    want = {tuple(param_str(c.get(f)) for f in COST_FIELDS) for c in configs}
    rates = []
    for r in stored:
        if r.status == "diverged" or not r.metrics.get("steps") or "wall_time_s" not in r.metrics:
            continue  # a diverged run stops early
        if tuple(r.params.get(f, "") for f in COST_FIELDS) in want:
            rates.append(r.metrics["wall_time_s"] / r.metrics["steps"])
        if len(rates) >= 50:
            break
    return (statistics.median(rates), len(rates)) if rates else None


def seed_spread(configs: list[dict], stored: list[StoredRun]
                ) -> Optional[tuple[float, int, int, float, int]]:
    """Pooled within-recipe sd of final F1 (diverged = 0) over earlier runs whose config equals a
    planned cell's except for the seed: (sd, df, recipes, divergence rate, runs) or None."""
    keys = {_recipe_key({k: param_str(v) for k, v in c.items()}) for c in configs}
    groups: dict[tuple, dict[str, float]] = {}
    for r in stored:
        key = _recipe_key(r.params)
        if key not in keys:
            continue
        f1 = 0.0 if r.status == "diverged" else r.metrics.get("final_val_f1", math.nan)
        seed = r.params.get("seed", "?")
        groups.setdefault(key, {}).setdefault(seed, f1)  # newest first: the latest per seed
    ss, df, n, div = 0.0, 0, 0, 0
    for g in groups.values():
        vals = [v for v in g.values() if math.isfinite(v)]
        n += len(vals)
        div += sum(v == 0.0 for v in vals)
        if len(vals) >= 2:
            m = statistics.fmean(vals)
            ss += sum((v - m) ** 2 for v in vals)
            df += len(vals) - 1
    if df == 0:
        return None
    return math.sqrt(ss / df), df, len(groups), div / n if n else math.nan, n


def _recipe_key(params: dict[str, str]) -> tuple:
    """The config fields that make a recipe, as logged params. Other params (`fix.*`) are left
    out; a field a run does not have (logged before the field existed) takes its default, whose
    behaviour is what that run had (see designs.KEY_FIELDS_V1)."""
    if not _DEFAULTS:
        from model.config import TrainConfig

        _DEFAULTS.update({k: param_str(v) for k, v in TrainConfig().to_dict().items()
                          if k not in NOT_RECIPE})
    return tuple((k, params.get(k, d)) for k, d in sorted(_DEFAULTS.items()))


_DEFAULTS: dict[str, str] = {}


def detectable_effect(sd: float, n_runs: int, df: int, alpha: float = ALPHA,
                      power: float = POWER) -> float:
    """Smallest two-level factorial effect (mean at + minus mean at -) detected with `power` by
    the model's two-sided t test: the effect's SE is 2 sd / sqrt(N) on `df` residual df."""
    from scipy.optimize import brentq
    from statsmodels.stats.power import ttest_power

    if df < 1 or n_runs < 2:
        return math.nan
    # ttest_power's noncentrality is es * sqrt(nobs); with es = effect / (2 sd) and nobs = N it
    # is effect / SE(effect).
    def gap(e: float) -> float:  # scipy's noncentral t returns NaN where power is ~1
        v = ttest_power(e, n_runs, alpha, df=df)
        return (1.0 if math.isnan(v) else float(v)) - power

    hi = 0.1 / math.sqrt(n_runs)
    while gap(hi) < 0:
        hi *= 2
    es = brentq(gap, 1e-9, hi)
    return 2 * sd * es


def detectable_paired(sd: float, seeds: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """One-at-a-time: a paired difference over seeds (sd of a difference = sqrt(2) sd)."""
    from statsmodels.stats.power import TTestPower

    if seeds < 2:
        return math.nan
    es = TTestPower().solve_power(effect_size=None, nobs=seeds, alpha=alpha, power=power)
    return float(es) * math.sqrt(2) * sd


@dataclass(frozen=True)
class RateTest:
    """The rate test the analysis runs for one contrast in one regime (ablations/results/rates.py):
    `paired` (Newcombe's paired score interval over n pairs) or independent arms of n runs
    each (Newcombe's hybrid score), and what n counts, for the printed line."""

    paired: bool
    n: int
    counts: str


def rate_test(spec: StudySpec) -> RateTest:
    """Which rate test the analysis runs, over how many pairs or runs (rates.rate_difference:
    paired where two or more partners exist, runs differing only in the factor at one seed).
    Rates are compared per regime (stress factors other than the axis: separate tests).
      one at a time: each contrast (add X to broken vs broken; fixed vs drop X) pairs its two
                     recipes' runs, seed by seed at each stress cell of the regime;
      full factorial: every run has a partner differing in the factor alone: runs / 2 pairs;
      fractional: no run has such a partner: independent arms of runs / 2."""
    seeds = len(spec.seeds)
    runs = len(designs.cells(spec)) * seeds  # (not designs.runs: resolving every config is slow)
    n_stress, n_regimes = stress_counts(spec)
    per = " per regime" if n_regimes > 1 else ""
    if spec.design == "one_at_a_time":
        n = seeds * n_stress // n_regimes
        how = (f"{seeds} seeds x {n_stress // n_regimes} stress cells"
               if n_stress > n_regimes else f"{seeds} seeds")
        test = RateTest(True, n, f"{n} pairs ({how}) per contrast{per}")
    elif spec.design == "full_factorial":
        n = runs // 2 // n_regimes
        test = RateTest(True, n, f"{n} pairs (runs differing in the factor only){per}")
    else:
        n = runs // 2 // n_regimes
        return RateTest(False, n, f"{n} vs {n} runs{per}")
    if n < 2:  # rates.rate_difference needs two pairs; with one it compares 1 run vs 1 run
        return RateTest(False, n, f"{n} vs {n} runs{per}")
    return test


def detectable_rate(test: RateTest, alpha: float = ALPHA, power: float = POWER
                    ) -> tuple[float, float]:
    """(rise from 0 %, difference around 50 %) that the analysis's rate test detects with
    `power`: the smallest difference from which its exact power stays >= `power`, on a grid of
    0.1 percentage points (ablations/results/rate_power.py; a pair's two runs independent given their
    arms' rates). Exact where the normal approximation on Cohen's h, used before, was not: it
    promised 80 % for 0 % -> 4 % with 96 pairs; the paired Newcombe test has 34 % there."""
    from ablations.results import rate_power

    if test.n < 2:
        return math.nan, math.nan
    if test.paired:
        def power_at(p_on: float, p_off: float) -> float:
            return rate_power.paired_power(test.n, p_on, p_off, alpha)
    else:
        def power_at(p_on: float, p_off: float) -> float:
            return rate_power.indep_power(test.n, test.n, p_on, p_off, alpha)
    return (rate_power.detectable_rise(power_at, power),
            rate_power.detectable_around_half(power_at, power))


# ------------------------------------------------------------------------------ the plan
def model_terms(spec: StudySpec) -> tuple[int, str]:
    """(parameters of the analysis model per replicate, alias text) of a factorial design."""
    from ablations.results import effects

    names = [f.name for f in spec.design_factors]
    if spec.design == "fractional_factorial":
        aliases = effects.aliases_from_note(designs.describe_fraction(spec.design_factors,
                                                                      spec.fraction), names)
    else:
        aliases = effects.Aliases(tuple(names))
    est = aliases.estimable(2)
    lines = []
    for w, al in est:
        short = [a for a in al if a.count(":") <= 2]
        if short:
            lines.append(f"    {effects.term_name(w, names)} = {' = '.join(short)}")
    return 1 + len(est), "\n".join(lines)


def plan(spec: StudySpec, tracking_uri: str, target_effect: Optional[float] = None,
         sd: Optional[float] = None) -> list[str]:
    """The lines `runner.py plan` prints."""
    out = design_lines(spec)
    search = spec.design == "search"
    runs = [] if search else designs.runs(spec)
    configs = ([designs.resolve(spec, designs.Cell(tuple((f.name, f.values[0] if f.values else
                                                          f.range.low) for f in spec.factors)),
                                spec.seeds[0]).to_dict()] if search else
               [r.config.to_dict() for r in runs])
    stored, where = read_runs(tracking_uri)
    out.append(wall_time_line(spec, stored, where, configs))
    if search:
        out.append("power: a search is not a designed comparison (the sampler picks the cells); "
                   "no detectable effect to compute. Run a factorial study to test claims.")
        return out
    spread = seed_spread(configs, stored)
    if sd is not None:
        sd_note = f"F1 sd between seeds {sd:g} (given with --sd)"
    elif spread:
        sd = spread[0]
        sd_note = (f"F1 sd between seeds {sd:.4f}, pooled over {spread[2]} recipe(s) of this plan "
                   f"already in the store ({spread[4]} runs, {spread[1]} df)")
    else:
        sd = DEFAULT_SD
        sd_note = (f"F1 sd between seeds {sd:g}: an assumed default, no earlier runs of these "
                   f"recipes in the store (give --sd, or run a pilot: a few cells x 3 seeds)")
    out.append(f"power (80 %, two-sided alpha 0.05; {sd_note}):")
    seeds = len(spec.seeds)
    cells = len(runs) // max(1, seeds)
    n_regimes = stress_counts(spec)[1]
    if spec.design == "one_at_a_time":
        d = detectable_paired(sd, seeds)
        out.append(f"  smallest F1 effect: {_f(d)} (each background apart, paired over "
                   f"{seeds} seeds)")
        need = _seeds_for(target_effect, lambda s: detectable_paired(sd, s))
    else:  # factors with more than two levels: a cell-means model (one term per cell)
        p = model_terms(spec)[0] if all(len(f.values) == 2 for f in spec.factors) else cells
        n = len(runs)
        d = detectable_effect(sd, n, n - p)
        out.append(f"  smallest F1 effect: {_f(d)} (factorial model, {n} runs, {n - p} residual "
                   f"df)" if n > p else
                   f"  smallest F1 effect: not computable with {seeds} seed(s): no residual df "
                   f"(Lenth's method and the half-normal plot only); use 2 or more seeds")
        need = _seeds_for(target_effect, lambda s: detectable_effect(sd, cells * s, cells * s - p))
    if spec.stress_factors:
        out.append(f"  stress: divergence and collapse rates compared per regime ({n_regimes})"
                   + (" and per background (added to broken, dropped from fixed)"
                      if spec.design == "one_at_a_time" else "")
                   + ", over the ladder's runs and seeds")
    test = rate_test(spec)
    rise, half = detectable_rate(test)
    # the verdicts' family: two tests per fix and regime (divergence and collapse, or with an lr
    # ladder the edge shift and the unstable rate), in each of a one-at-a-time design's two
    # backgrounds (added to broken, dropped from fixed)
    backgrounds = 2 if spec.design == "one_at_a_time" else 1
    m = 2 * sum(f.kind == "fix" for f in spec.design_factors) * n_regimes * backgrounds
    rise_h, half_h = detectable_rate(test, alpha=ALPHA / max(1, m))
    name = ("the paired Newcombe score test the analysis runs" if test.paired else
            "Newcombe's hybrid score test for independent arms, which the analysis runs")
    assume = ", a pair's runs taken as independent" if test.paired else ""
    out.append(f"  smallest divergence/collapse rate difference (exact power of {name}: "
               f"{test.counts}{assume}; power stays >= 80 % above it): 0 % -> {_pct(rise)}, or "
               f"+-{_pct(half)} around 50 %; at Holm's strictest level (alpha 0.05/{m}, the "
               f"first of {m} instability tests): 0 % -> {_pct(rise_h)}, +-{_pct(half_h)}")
    if target_effect is not None:
        out.append(f"  seeds for an F1 effect of {target_effect:g}: " +
                   (f"{need} (this plan has {seeds})" if need else "more than 64"))
    return out


def preamble(spec: StudySpec, tracking_uri: str) -> list[str]:
    """What `run` prints before it starts: the design and the wall-time estimate."""
    try:
        stored, where = read_runs(tracking_uri)
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a launch
        stored, where = [], f"{tracking_uri} (not readable: {type(e).__name__})"
    configs = ([] if spec.design == "search" else [r.config.to_dict() for r in designs.runs(spec)])
    if not configs:
        configs = [designs.resolve(spec, designs.Cell(tuple(
            (f.name, f.values[0] if f.values else f.range.low) for f in spec.factors)),
            spec.seeds[0]).to_dict()]
    # `run` has printed the plan's size already ("plan: ... runs"): not again here
    lines = [ln for ln in design_lines(spec) if " seeds = " not in ln]
    return lines + [wall_time_line(spec, stored, where, configs)]


def stress_counts(spec: StudySpec) -> tuple[int, int]:
    """(stress combinations per design cell, regimes): a regime is a combination of the stress
    factors other than the axis (lr, else the first numeric one; see ablations/results/stability.py)."""
    stress = spec.stress_factors
    n = math.prod(len(f.values) for f in stress) if stress else 1
    numeric = [f for f in stress if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in f.values)]
    axis = next((f for f in stress if f.name == "lr"), numeric[0] if numeric else None)
    return n, n // len(axis.values) if axis else n


def _seeds_for(target: Optional[float], detectable) -> Optional[int]:
    if target is None:
        return None
    for s in range(1, 65):
        d = detectable(s)
        if math.isfinite(d) and d <= abs(target):
            return s
    return None


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f} %"


def _f(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def design_lines(spec: StudySpec) -> list[str]:
    """Design, cells, runs and aliases (also printed by `run` before it starts)."""
    seeds = len(spec.seeds)
    if spec.design == "search":
        return [f"design: search ({spec.sampler}), {spec.trials} trials x {seeds} seeds = "
                f"{(spec.trials or 0) * seeds} runs; the sampler chooses the cells: importance "
                f"and associations only, no verdicts"]
    cells = len(designs.cells(spec))
    head = f"design: {spec.design}"
    if spec.design == "fractional_factorial":
        head += " " + designs.describe_fraction(spec.design_factors, spec.fraction)
    out = [head]
    if spec.stress_factors:
        n_stress = stress_counts(spec)[0]
        out.append(f"  {cells // n_stress} design cells x {n_stress} stress combinations ("
                   + " x ".join(f"{f.name} {len(f.values)}" for f in spec.stress_factors)
                   + f") = {cells} cells")
    out.append(f"  {cells} cells x {seeds} seeds = {cells * seeds} runs")
    if spec.design in ("full_factorial", "fractional_factorial") and all(
            len(f.values) == 2 for f in spec.factors):
        p, alias_text = model_terms(spec)
        out.append(f"  model: {p} terms (mean, {len(spec.design_factors)} main effects, "
                   f"{p - 1 - len(spec.design_factors)} two-factor interaction sets); "
                   f"{cells * seeds - p} residual df")
        out.append("  aliases (up to three-factor terms):\n" + alias_text if alias_text else
                   "  aliases: none up to three-factor terms (main effects and two-factor "
                   "interactions all clear)")
    elif spec.design == "one_at_a_time":
        out.append("  effects: each fix in two backgrounds apart (added to broken, dropped from "
                   "fixed), per regime, paired by seed and stress cell (no interactions)")
    return out


def wall_time_line(spec: StudySpec, stored: list[StoredRun], where: str, configs: list[dict]) -> str:
    n_runs = len(configs) if spec.design != "search" else (spec.trials or 0) * len(spec.seeds)
    steps = statistics.fmean(c["epochs"] * c["steps_per_epoch"] for c in configs)
    sps = seconds_per_step(spec, stored, configs)
    if sps is None:
        why = where if where.startswith("no tracking store") else \
            f"no finished run of this model size in {where}"
        return f"wall time: none known ({why}); {n_runs} runs x {steps:.0f} steps"
    total = sps[0] * steps * n_runs
    return (f"wall time: about {_dur(total)} with 1 worker ({n_runs} runs x {steps:.0f} steps x "
            f"{sps[0] * 1000:.1f} ms/step, median of {sps[1]} recent runs of this model size in "
            f"{where}; diverged runs stop early, so less if some diverge)")


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
