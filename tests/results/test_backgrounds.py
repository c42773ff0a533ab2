"""Each fix in each background, the edge as an estimate, missing runs, and the verdicts built on
them: hand-made tables with planted answers (issue: stress evidence that holds up)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablations.results import analysis, backgrounds, edges, stability
from ablations.results.stability import layout
from ablations.results.verdicts import judge

LADDER = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ROLES = ("broken", "add:bias_init", "drop:bias_init", "fixed")


def oat_runs(edge: dict[str, float], seeds=3, regimes=("fp32",), loss=None, init=None,
             ladder=LADDER) -> pd.DataFrame:
    """A one-at-a-time table of one fix (bias_init) on an lr ladder: per role the rung above
    which a run collapses; `loss(role, lr, seed)` the final loss of a stable run."""
    rows = []
    for prec in regimes:
        for role in ROLES:
            on = role in ("add:bias_init", "fixed")
            for seed in range(seeds):
                for lr in ladder:
                    ok = lr <= edge[role]
                    val = loss(role, lr, seed) if loss else 0.4 + 0.01 * math.log10(lr)
                    rows.append({"cell": f"bias_init={'on' if on else 'off'} lr={lr:g} "
                                         f"precision={prec} r={role}",
                                 "seed": seed, "lr": lr, "precision": prec, "roles": role,
                                 "bias_init": on, "status": "converged" if ok else "collapsed",
                                 "final_val_loss": val if ok else 0.69,
                                 "final_val_f1": 0.6 if ok else 0.0,
                                 "init_val_loss": init(role, seed) if init else 0.7,
                                 "init_loss": 0.7, "nonfinite_events": 0, "steps": 20.0})
    return analysis.prepare(pd.DataFrame(rows))


def lay_of(runs: pd.DataFrame):
    return layout(runs, ["bias_init", "lr", "precision"], ["lr", "precision"])


# ------------------------------------------------------------------------ keyed by the whole run
def test_one_at_a_time_pairs_by_seed_and_rung_not_by_whichever_came_last():
    """F1 falls steeply with the rung; the fix adds +0.30 added to broken and 0 dropped from
    fixed, at every rung. Keyed by role and seed only, the last run per seed decided the answer
    (+0.78 and -0.52 on such a table); keyed by the stress cell too, the planted truth."""
    rows = []
    rng = np.random.default_rng(0)
    for role in ROLES:
        effect = 0.30 if role == "add:bias_init" else 0.0
        for seed in range(3):
            for k, lr in enumerate(LADDER):
                rows.append({"cell": f"{role} lr={lr:g}", "seed": seed, "lr": lr,
                             "roles": role, "bias_init": role in ("add:bias_init", "fixed"),
                             "status": "converged", "steps": 20.0,
                             "final_val_f1": 0.9 - 0.15 * k + effect + 0.01 * rng.normal()})
    runs = analysis.prepare(pd.DataFrame(rows)).sample(frac=1.0, random_state=1)  # any order
    oat = analysis.one_at_a_time(runs, stress=["lr"]).set_index("background")
    assert oat.loc["added to broken", "effect"] == pytest.approx(0.30, abs=0.03)
    assert oat.loc["dropped from fixed", "effect"] == pytest.approx(0.0, abs=0.03)
    assert oat.loc["added to broken", "rungs"] == "lr 0.001..10 (5 rungs, mean per seed)"
    assert oat.loc["added to broken", "n"] == 3  # seeds, not seed x rung pairs
    assert set(oat["backgrounds"]) == {"differ"}


def test_opposite_effects_in_the_two_backgrounds_are_reported_as_such():
    """The fix prevents every failure added to broken (15/15 -> 0/15) and causes them dropped
    from fixed (0/15 -> 15/15). Each contrast alone is clear; pooled they would cancel
    (15/30 vs 15/30). Both backgrounds are tested apart, flagged opposite, and the verdict is
    background-dependent, naming both."""
    runs = oat_runs({"broken": 0.0, "add:bias_init": 10.0, "drop:bias_init": 10.0,
                     "fixed": 0.0})
    tests = backgrounds.rate_tests(runs, ["bias_init"], ["lr", "precision"], axis="lr")
    col = tests[tests.outcome == "collapsed"].set_index("background")
    assert col.loc["added to broken", "counts"] == "0/15 vs 15/15"
    assert col.loc["dropped from fixed", "counts"] == "15/15 vs 0/15"
    assert col.loc["added to broken", "high"] < 0 < col.loc["dropped from fixed", "low"]
    assert set(col["backgrounds"]) == {"opposite"}
    v = analysis.verdicts(pd.DataFrame({"factor": ["bias_init"], "outcome": ["diverged"]}), runs,
                          analysis.claim_estimates(runs, ["bias_init", "lr", "precision"],
                                                   ["lr", "precision"])).set_index("fix")
    assert v.loc["bias_init", "verdict"] == "background-dependent"
    assert "added to broken" in v.loc["bias_init", "reason"]
    assert "dropped from fixed" in v.loc["bias_init", "reason"]


def test_edge_verdict_names_its_background_and_regime():
    """The fix raises the edge by two decades added to broken, in fp16 only."""
    def edge(prec):
        return {"broken": 1e-2, "add:bias_init": 1.0 if prec == "fp16" else 1e-2,
                "drop:bias_init": 1e-1, "fixed": 1e-1}
    runs = pd.concat([oat_runs(edge(p), regimes=(p,), seeds=5) for p in ("fp32", "fp16")],
                     ignore_index=True)
    lay = lay_of(runs)
    eff = stability.fix_effects(runs, lay)
    es = eff[eff.outcome == "edge_shift"].set_index(["background", "regime"])
    hit = es.loc[("added to broken", "precision=fp16")]
    assert hit["effect"] == pytest.approx(2.0, abs=0.05) and hit["low"] > 0
    assert es.loc[("added to broken", "precision=fp32"), "effect"] == pytest.approx(0, abs=0.05)
    claims = analysis.claim_estimates(runs, ["bias_init", "lr", "precision"],
                                      ["lr", "precision"], eff)
    v = judge(claims)["bias_init"]
    assert v.verdict == "supported"
    head = v.reason.split(". ")[0]
    assert "edge shift (log10 LR50) (added to broken, precision=fp16)" in head
    assert "improves" in head and "fp32" not in head


# ------------------------------------------------------------------------ missing runs
def test_a_missing_run_is_never_counted_as_stable():
    """Stable up to lr 0.1 and failed at 1 and 10, but seed 2's runs at lr 1 and 10 crashed past
    their retries: the rung table must not read 'max stable 10', and the crash is shown."""
    runs = oat_runs({"broken": 0.1, "add:bias_init": 0.1, "drop:bias_init": 0.1, "fixed": 0.1})
    gone = (runs.roles == "fixed") & (runs.seed == 2) & (runs.lr >= 1.0)
    crashed, runs = runs[gone], runs[~gone]
    lay = lay_of(runs)
    t = stability.recipe_table(runs, lay, crashed).set_index("recipe")
    assert t.loc["fixed", "max_stable_lr"] == pytest.approx(0.1)
    assert t.loc["fixed", "runs"] == "13 of 15 (2 crashed)"
    assert t.loc["fixed", "LR50 [95% CI]"].endswith("(incomplete)")
    ps = stability.per_seed(runs, lay, crashed).set_index(["recipe", "seed"])
    assert ps.loc[("fixed", 2), "edge_low"] == -1 and ps.loc[("fixed", 2), "edge_high"] == math.inf
    # without the crash list the same holes read 'missing'
    t2 = stability.recipe_table(runs, lay).set_index("recipe")
    assert t2.loc["fixed", "runs"] == "13 of 15 (2 missing)"
    # the LR sensitivity of a pair covers the same rungs in both arms: dropping the fixed
    # recipe's holes from the partner too gives the same answer as with them
    eff = stability.fix_effects(runs, lay).set_index(["background", "outcome"])
    assert eff.loc[("dropped from fixed", "lr_sensitivity"), "n"] == 3


def test_a_missing_rung_between_known_ones_widens_the_seed_interval():
    iv = edges.seed_interval([-3, -2, -1, 0, 1], [True, True, None, False, False], -3)
    assert (iv.low, iv.high) == (-2, 0)  # the missing rung -1 could be either side


# ------------------------------------------------------------------------ LR sensitivity
def test_lr_sensitivity_compares_like_starting_points():
    """Two recipes with identical final losses and failures: the training loss of step 1 differs
    (0.7 vs 1.2) but the initial *validation* loss is the same. The old l0 gave an LRS effect of
    +0.32 [+0.32, +0.32]; now 0, and seeds that tie say so instead of a zero-width interval."""
    runs = oat_runs({r: 0.1 for r in ROLES})
    runs.loc[runs.roles == "add:bias_init", "init_loss"] = 1.2
    lay = lay_of(runs)
    eff = stability.fix_effects(runs, lay).set_index(["background", "outcome"])
    row = eff.loc[("added to broken", "lr_sensitivity")]
    assert row["effect"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(row["low"]) and "all 3 seeds agree" in row["shown"]
    assert stability.hurts(eff.reset_index()).empty


def test_init_val_loss_falls_back_to_the_step_one_loss_for_old_runs():
    df = pd.DataFrame({"init_val_loss": [0.69, math.nan, math.nan],
                       "init_loss": [0.9, 0.8, math.nan]})
    assert stability.init_losses(df).tolist() == pytest.approx([0.69, 0.8, math.log(2)])


# ------------------------------------------------------------------------ censoring, Holm
def test_an_edge_past_the_ladder_is_a_bound_never_a_number():
    runs = oat_runs({"broken": 1e-2, "add:bias_init": 10.0, "drop:bias_init": 1e-2,
                     "fixed": 1e-2})
    lay = lay_of(runs)
    t = stability.recipe_table(runs, lay).set_index("recipe")
    assert t.loc["add:bias_init", "LR50 [95% CI]"].startswith("> ")
    assert math.isnan(t.loc["add:bias_init", "lr50_log10"])
    es = stability.fix_effects(runs, lay).set_index(["background", "outcome"])
    row = es.loc[("added to broken", "edge_shift")]
    assert row["shown"].startswith("> +") and row["high"] == math.inf and math.isnan(row["effect"])
    assert not row["untested"]  # one edge is bounded: the test still can reject


def test_both_edges_past_the_ladder_are_untested_and_left_out_of_holm():
    runs = oat_runs({r: 10.0 for r in ROLES})
    lay = lay_of(runs)
    eff = stability.fix_effects(runs, lay)
    edge = eff[eff.outcome == "edge_shift"]
    assert edge["untested"].all()
    rate = eff[eff.outcome == "unstable_rate"]
    assert rate["untested"].all()  # 0/n vs 0/n
    claims = analysis.claim_estimates(runs, ["bias_init", "lr", "precision"],
                                      ["lr", "precision"], eff)
    v = judge(claims)["bias_init"]
    assert v.verdict == "untested" and all(p is None for p in v.adjusted_p)


def test_n_of_n_versus_n_of_n_is_untested():
    runs = oat_runs({r: 0.0 for r in ROLES})  # every run fails
    tests = backgrounds.rate_tests(runs, ["bias_init"], ["lr", "precision"], axis="lr")
    assert tests[tests.outcome == "collapsed"]["untested"].all()
    claims = analysis.background_estimates(tests)
    assert all(e.untested for e in claims["bias_init"])


def test_adjusted_p_values_are_kept_per_test_not_per_label():
    """Two tests with the same outcome name in two backgrounds: both adjusted, neither lost."""
    from ablations.results.verdicts import ClaimEstimate

    a = ClaimEstimate("divergence rate", -0.5, -0.8, -0.2, 0.001, background="added to broken")
    b = ClaimEstimate("divergence rate", -0.1, -0.3, 0.1, 0.4, background="dropped from fixed")
    v = judge({"x": [a, b]})["x"]
    assert v.adjusted_p == pytest.approx((0.002, 0.4))
    assert v.verdict == "supported" and "(added to broken)" in v.reason


# ------------------------------------------------------------------------ the edge model itself
def test_lr50_of_seeds_that_agree_spans_their_rungs():
    ivs = [edges.Interval(-1, 0)] * 3
    e = edges.lr50(ivs, [-3, -2, -1, 0, 1])
    assert e.value == pytest.approx(-0.5, abs=0.03)
    assert e.low < -1 < 0 < e.high and not e.censored


def test_shift_p_value_is_dual_to_its_interval():
    off = [edges.Interval(-2, -1)] * 3
    for on, excludes in (([edges.Interval(0, 1)] * 3, True), ([edges.Interval(-2, -1)] * 2
                                                             + [edges.Interval(-1, 0)], False)):
        e = edges.shift(off, on, [-3, -2, -1, 0, 1])
        assert (e.low > 0 or e.high < 0) == excludes
        assert (e.p < 0.05) == excludes
