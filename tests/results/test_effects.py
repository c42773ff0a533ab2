"""The factorial model, rate intervals and the verdict rule against known truth."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from ablations.results import analysis, effects, rates
from ablations.results.verdicts import ClaimEstimate, holm, judge

# Montgomery, "Design and Analysis of Experiments" (8th ed., 2013), Example 6.2, Table 6.10:
# filtration rate (gal/h) of a chemical product, an unreplicated 2^4 in A (temperature),
# B (pressure), C (formaldehyde concentration), D (stirring rate); standard order
# (1), a, b, ab, c, ac, bc, abc, d, ad, bd, abd, cd, acd, bcd, abcd.
FILTRATION = [45, 71, 48, 65, 68, 60, 80, 65, 43, 100, 45, 104, 75, 86, 70, 96]
# Table 6.11: the effect estimates.
MONTGOMERY_EFFECTS = {"A": 21.625, "B": 3.125, "C": 9.875, "D": 14.625, "A:B": 0.125,
                      "A:C": -18.125, "A:D": 16.625, "B:C": 2.375, "B:D": -0.375, "C:D": -1.125,
                      "A:B:C": 1.875, "A:B:D": 4.125, "A:C:D": -1.625, "B:C:D": -2.625,
                      "A:B:C:D": 1.375}


def filtration() -> pd.DataFrame:
    rows = []
    for i, y in enumerate(FILTRATION):
        rows.append({**{f: bool((i >> k) & 1) for k, f in enumerate("ABCD")}, "y": float(y),
                     "seed": 0})
    return pd.DataFrame(rows)


def test_montgomery_example_6_2_reproduced_exactly():
    """Every effect of Table 6.11 (saturated model, effect = 2 x coefficient), and the reduced
    model of Example 6.2 (A, C, D, AC, AD): regression equation (eq. 6.xx) y = 70.06 + 10.81 x1
    + 4.94 x3 + 7.31 x4 - 9.06 x1x3 + 8.31 x1x4 and error sum of squares 195.12 on 10 df
    (Table 6.13)."""
    df = filtration()
    full = effects.factorial_fit(df, list("ABCD"), "y", terms=list(MONTGOMERY_EFFECTS))
    got = full.table.set_index("term")["effect"]
    for term, value in MONTGOMERY_EFFECTS.items():
        assert got[term] == pytest.approx(value, abs=1e-9), term
    assert full.df_resid == 0 and full.method == "Lenth PSE"

    red = effects.factorial_fit(df, list("ABCD"), "y", terms=["A", "C", "D", "A:C", "A:D"])
    params = red.result.params
    assert params["Intercept"] == pytest.approx(70.0625)
    assert list(params[["A", "C", "D", "A:C", "A:D"]]) == pytest.approx(
        [10.8125, 4.9375, 7.3125, -9.0625, 8.3125])
    assert red.result.ssr == pytest.approx(195.125) and red.df_resid == 10
    assert red.method == "t (residual error)"
    # the t interval of A from the residual mean square 19.51: 21.625 +- t(0.975, 10) * 2 * sqrt(19.51/16)
    half = 2.228138851986 * 2 * math.sqrt(195.125 / 10 / 16)
    a = red.table.set_index("term").loc["A"]
    assert (a.low, a.high) == pytest.approx((21.625 - half, 21.625 + half))


def test_lenth_pse_on_the_filtration_effects():
    """Lenth (1989) by hand on the 15 effects: s0 = 1.5 * median|c| = 1.5 * 2.625 = 3.9375;
    dropping |c| >= 2.5 s0 = 9.84 leaves 10 effects with median 1.75, so PSE = 2.625 and
    ME = t(0.975, 5) * 2.625."""
    pse, me, df = effects.lenth(list(MONTGOMERY_EFFECTS.values()))
    assert pse == pytest.approx(2.625)
    assert df == 5 and me == pytest.approx(2.570581836 * 2.625)
    hn = effects.half_normal(pd.Series(MONTGOMERY_EFFECTS))
    assert list(hn["term"].tail(2)) == ["A:C", "A"] and hn["quantile"].is_monotonic_increasing


# ---------------------------------------------------------------------- simulated designs
def simulate(rng, factors, rows, truth: dict[str, float], noise: float, seeds: int) -> pd.DataFrame:
    """y = 0.7 + sum over terms of truth/2 * (product of codes) + N(0, noise), per seed."""
    out = []
    for code in rows:
        x = dict(zip(factors, code))
        mean = 0.7 + sum(v / 2 * np.prod([x[f] for f in t.split(":")]) for t, v in truth.items())
        for s in range(seeds):
            out.append({**{f: bool(x[f] > 0) for f in factors}, "seed": s,
                        "final_val_f1": mean + rng.normal(0, noise)})
    return pd.DataFrame(out)


FULL4 = ["bias_init", "no_clamp", "plain_residual", "layer_norm"]
FRAC5 = FULL4 + ["clip_0_5"]
TRUTH = {"layer_norm": -0.20, "bias_init": 0.02, "no_clamp": 0.0, "plain_residual": 0.05,
         "bias_init:layer_norm": 0.03}


def full_rows(k: int) -> list[tuple[int, ...]]:
    return list(itertools.product((-1, 1), repeat=k))


def half_rows() -> list[tuple[int, ...]]:  # 2^(5-1), E = ABCD
    return [r + (int(np.prod(r)),) for r in full_rows(4)]


@pytest.mark.parametrize("factors,rows", [(FULL4, full_rows(4)), (FRAC5, half_rows())],
                         ids=["2^4", "2^(5-1)"])
def test_ci_coverage_is_nominal(factors, rows):
    """200 repeats, 2 seeds: every main effect and two-factor interaction's 95 % CI covers its
    true value (zero for most) in 93-97 % of the 200 x 10..15 intervals."""
    rng = np.random.default_rng(13)
    aliases = effects.Aliases(tuple(factors)) if len(factors) == 4 else effects.aliases_from_runs(
        simulate(rng, factors, rows, TRUTH, 0.02, 1), factors)
    covered = total = 0
    for _ in range(200):
        runs = simulate(rng, factors, rows, TRUTH, 0.03, 2)
        fit = effects.factorial_fit(runs, factors, "final_val_f1", aliases, bootstrap=False)
        for r in fit.table.itertuples():
            covered += r.low <= TRUTH.get(r.term, 0.0) <= r.high
            total += 1
        assert fit.method == "t (residual error)"
    assert total >= 2000 and 0.93 <= covered / total <= 0.97, covered / total


def test_one_large_effect_does_not_widen_the_others():
    """The issue's case: with layer_norm at -0.20, the old unpaired comparison in a fraction puts
    that effect into every other factor's noise; the design's model removes it."""
    runs = analysis.prepare(simulate(np.random.default_rng(1), FRAC5, half_rows(), TRUTH, 0.02, 2)
                            .assign(status="converged", roles="", cell="c", run_key=range(32)))
    fit = effects.factorial_fit(runs, FRAC5, "final_val_f1", effects.aliases_from_runs(runs, FRAC5))
    old = analysis.main_effects(runs, FRAC5, outcomes=["final_val_f1"]).set_index("factor")
    new = fit.table.set_index("term")
    assert not old.loc["bias_init", "paired"]
    width_old = old.loc["bias_init", "high"] - old.loc["bias_init", "low"]
    width_new = new.loc["bias_init", "high"] - new.loc["bias_init", "low"]
    assert width_new < width_old / 3, (width_new, width_old)
    assert new.loc["bias_init", "low"] > 0  # the 0.02 effect is found


def test_aliases_from_the_recorded_generators_and_from_the_runs():
    names = ["a1", "b1", "c1", "d1", "e1", "f1"]
    al = effects.aliases_from_note("Design: 2^(6-2) resolution IV: E=ABC, F=BCD "
                                   "(A=a1, B=b1, C=c1, D=d1, E=e1, F=f1)", names)
    est = dict((effects.term_name(w, names), a) for w, a in al.estimable())
    # 6 mains + 7 alias sets of two-factor interactions (AE = BC = DF, ...); of the 16 cells
    # the other 2 df belong to three-factor interactions (residual)
    assert len(est) == 13
    # words I = ABCE = BCDF = ADEF
    assert est["a1"] == ["b1:c1:e1", "d1:e1:f1", "a1:b1:c1:d1:f1"]
    assert est["a1:b1"] == ["c1:e1", "a1:c1:d1:f1", "b1:d1:e1:f1"]
    assert est["a1:e1"][:2] == ["b1:c1", "d1:f1"]
    assert "generators on the MLflow experiment: E=ABC, F=BCD" in al.source
    # the same structure read off the runs of that fraction
    rows = [r + (r[0] * r[1] * r[2], r[1] * r[2] * r[3]) for r in full_rows(4)]
    runs = pd.DataFrame([{n: v > 0 for n, v in zip(names, r)} for r in rows])
    from_runs = effects.aliases_from_runs(runs, names)
    assert {w for _, w in from_runs.words} == {w for _, w in al.words}
    assert effects.check_aliases(al, runs) is None
    assert effects.aliases_from_note("no design here", names) is None


def test_unreplicated_fraction_uses_lenth_and_the_bootstrap_is_only_a_check(monkeypatch):
    """One seed of a 2^(5-1): no residual df, Lenth margins. With 10 seeds no seed-cluster
    bootstrap is shown (too few clusters to cover: 91 %); with 30 it is, beside the t intervals,
    which stay the method even with few residual df."""
    rng = np.random.default_rng(3)
    one = simulate(rng, FRAC5, half_rows(), TRUTH, 0.02, 1)
    fit = effects.factorial_fit(one, FRAC5, "final_val_f1", effects.aliases_from_runs(one, FRAC5))
    assert fit.df_resid == 0 and fit.method == "Lenth PSE" and len(fit.table) == 15
    ln = fit.table.set_index("term").loc["layer_norm"]
    assert ln.high < 0  # -0.20 stands out of 15 effects
    ten = simulate(rng, FRAC5, half_rows(), TRUTH, 0.02, 10)
    fit10 = effects.factorial_fit(ten, FRAC5, "final_val_f1", effects.aliases_from_runs(ten, FRAC5))
    assert "boot_low" not in fit10.table and fit10.method.startswith("t")
    many = simulate(rng, FRAC5, half_rows(), TRUTH, 0.02, effects.BOOT_MIN_SEEDS)
    fitm = effects.factorial_fit(many, FRAC5, "final_val_f1", effects.aliases_from_runs(many, FRAC5))
    assert "boot_low" in fitm.table and fitm.method.startswith("t")
    # one seed of a 2^(5-1) (16 runs, 16 terms) and two runs of a second: 2 residual df, still
    # t intervals, with a note
    extra = simulate(rng, FRAC5, half_rows(), TRUTH, 0.02, 1).iloc[:2].assign(seed=1)
    two = pd.concat([one, extra], ignore_index=True)
    fit2 = effects.factorial_fit(two, FRAC5, "final_val_f1", effects.aliases_from_runs(two, FRAC5))
    assert 1 <= fit2.df_resid < effects.MIN_DF and fit2.method.startswith("t")
    assert any("residual df: the t intervals are wide" in n for n in fit2.notes)


# ---------------------------------------------------------------------- rates
def test_zero_of_n_vs_zero_of_n_has_its_real_interval():
    """0/8 vs 0/8: Newcombe's interval is +-0.324 (Wilson upper bound of 0/8: 1.96^2/(8+1.96^2)),
    not the bootstrap's [0, 0]; paired or not."""
    u = 1.959963985 ** 2 / (8 + 1.959963985 ** 2)
    for rd in (rates.rate_diff_indep(0, 8, 0, 8), rates.rate_diff_paired([0] * 8, [0] * 8)):
        assert rd.untested and rd.diff == 0 and rd.p == 1.0
        assert (rd.low, rd.high) == pytest.approx((-u, u))


@pytest.mark.parametrize("n", [4, 8, 12])
def test_newcombe_coverage_at_small_n(n):
    """Exact coverage (every outcome enumerated) of the independent interval at small n over a
    grid of true rates: never below 0.88, mean 0.94-0.98 (Newcombe 1998 reports mean 0.956, min
    ~0.88 for method 10). A Wald interval fails the same check (coverage 0 near 0)."""
    grid = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8]
    ci = functools.lru_cache(maxsize=None)(rates.newcombe_indep)  # intervals do not depend on p
    cov = [rates.exact_coverage_indep(p1, p0, n, n, ci) for p1 in grid for p0 in grid]
    assert min(cov) >= 0.88 and 0.94 <= float(np.mean(cov)) <= 0.98, (min(cov), np.mean(cov))

    def wald(x1, n1, x0, n0):
        d = x1 / n1 - x0 / n0
        se = math.sqrt(x1 / n1 * (1 - x1 / n1) / n1 + x0 / n0 * (1 - x0 / n0) / n0)
        return d - 1.96 * se, d + 1.96 * se

    assert rates.exact_coverage_indep(0.1, 0.0, n, n, wald) < 0.8 <= \
        rates.exact_coverage_indep(0.1, 0.0, n, n, ci)


def test_paired_coverage_at_small_n():
    """Exact coverage of the paired interval over all multinomial outcomes of 8 pairs
    (both, on only, off only, neither)."""
    from scipy.stats import multinomial

    n = 8
    for probs in ([0.0, 0.0, 0.3, 0.7], [0.1, 0.05, 0.25, 0.6], [0.0, 0.1, 0.1, 0.8],
                  [0.3, 0.0, 0.0, 0.7]):
        truth = probs[1] - probs[2]
        cover = 0.0
        for a in range(n + 1):
            for b in range(n + 1 - a):
                for c in range(n + 1 - a - b):
                    d = n - a - b - c
                    lo, hi = rates.newcombe_paired(a, b, c, d)
                    if lo - 1e-12 <= truth <= hi + 1e-12:
                        cover += multinomial.pmf([a, b, c, d], n, probs)
        assert cover >= 0.90, (probs, cover)


def test_pvalue_is_dual_to_the_interval():
    rd = rates.rate_diff_indep(0, 10, 6, 10)
    lo, hi = rates.newcombe_indep(0, 10, 6, 10, alpha=rd.p * 1.01)
    assert hi < 0
    lo, hi = rates.newcombe_indep(0, 10, 6, 10, alpha=rd.p * 0.99)
    assert lo <= 0 <= hi


# ---------------------------------------------------------------------- verdicts
def rate(outcome: str, x_on: int, x_off: int, n: int = 8) -> ClaimEstimate:
    rd = rates.rate_diff_indep(x_on, n, x_off, n)
    return ClaimEstimate(outcome, rd.diff, rd.low, rd.high, rd.p, "lower", (x_on, n, x_off, n))


def test_zero_vs_zero_is_untested_not_refuted():
    v = judge({"layer_norm": [rate("divergence rate", 0, 0), rate("collapse rate", 0, 0)]})
    assert v["layer_norm"].verdict == "untested"
    assert v["layer_norm"].reason.startswith("untested: nothing either arm could differ in (")
    assert "0/8 vs 0/8" in v["layer_norm"].reason


def test_holm_across_claims():
    """p = 0.01, 0.03, 0.04 alone would all pass 0.05; Holm: 0.03, 0.06, 0.06."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])

    def est(p: float, effect: float = -0.3) -> ClaimEstimate:
        return ClaimEstimate("divergence rate", effect, effect - 0.2, effect + 0.1, p)

    v = judge({"a": [est(0.01)], "b": [est(0.03)], "c": [est(0.04, effect=+0.3)],
               "d": [rate("divergence rate", 0, 0)]})
    assert v["a"].verdict == "supported" and v["b"].verdict == "inconclusive"
    assert v["c"].verdict == "inconclusive" and v["d"].verdict == "untested"
    assert v["a"].adjusted_p[0] == pytest.approx(0.03)  # d is not in the family
    assert v["d"].adjusted_p == (None,)
    worse = judge({"x": [est(0.001, effect=+0.4)]})
    assert worse["x"].verdict == "refuted"


def test_verdicts_on_runs_judge_instability_only():
    """A fix with a large F1 effect but no divergence or collapse in either arm is untested;
    one whose arm without it diverges 8/8 against 0/8 is supported (paired intervals)."""
    rows = []
    for bias, resid, seed in itertools.product([False, True], [False, True], range(8)):
        div = not resid
        rows.append({"bias_init": bias, "plain_residual": resid, "seed": seed,
                     "cell": f"bias_init={'on' if bias else 'off'} plain_residual="
                             f"{'on' if resid else 'off'}", "roles": "", "run_key": f"{bias}{resid}{seed}",
                     "status": "diverged" if div else "converged",
                     "final_val_f1": 0.5 + 0.3 * bias + 0.01 * seed, "steps": 10.0})
    runs = analysis.prepare(pd.DataFrame(rows))
    eff = analysis.main_effects(runs, ["bias_init", "plain_residual"], outcomes=["final_val_f1"])
    v = analysis.verdicts(eff, runs).set_index("fix")
    assert v.loc["plain_residual", "verdict"] == "supported"
    assert "0/16 vs 16/16" in v.loc["plain_residual", "evidence"]
    assert v.loc["bias_init", "verdict"] == "inconclusive"  # 8/16 vs 8/16: tested, no change
    runs2 = runs.assign(status="converged")
    runs2 = analysis.prepare(runs2)
    v2 = analysis.verdicts(eff, runs2).set_index("fix")
    assert (v2["verdict"] == "untested").all()
    assert "untested: nothing either arm could differ in" in v2.loc["bias_init", "reason"]


def test_an_outcome_unmeasured_at_one_level_is_not_modelled():
    """Every run at lr 1e6 diverged, so its loss is not measured there: the loss gets no model
    (lr would have one level), while F1 (diverged = 0) and the rates still do."""
    import pandas as pd

    from ablations.results import effects as fx

    rows = []
    for a in (False, True):
        for lr in (0.03, 1e6):
            for seed in range(3):
                rows.append({"a": a, "lr": lr, "seed": seed,
                             "final_val_f1": 0.0 if lr > 1 else 0.4 + 0.1 * a + 0.01 * seed,
                             "final_val_loss": float("nan") if lr > 1 else 0.5 - 0.01 * seed,
                             "diverged": float(lr > 1), "collapsed": 0.0})
    de = fx.factorial_effects(pd.DataFrame(rows), ["a", "lr"], outcomes=("final_val_f1",
                                                                         "final_val_loss"))
    assert set(de.fits) == {"final_val_f1"}
