"""Analysis on synthetic run tables whose true effects are known, plus the report and notebooks
on a tiny real study."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from ablations.results import analysis

FACTORS = ["bias_init", "no_clamp", "plain_residual"]
# y = BASE + sum(main) + interaction * a * b + seed effect + noise, with 0/1 coding of a, b, c.
BASE, MAIN, AB, NOISE = 0.80, {"bias_init": 0.05, "no_clamp": 0.02, "plain_residual": 0.0}, -0.03, 0.02


def synthetic_runs(rng: np.random.Generator, seeds: int = 5, p_div_off: float = 0.0) -> pd.DataFrame:
    rows = []
    seed_effect = rng.normal(0, 0.03, seeds)
    for combo in itertools.product([False, True], repeat=3):
        a = dict(zip(FACTORS, combo))
        for s in range(seeds):
            y = (BASE + sum(MAIN[f] for f in FACTORS if a[f]) + AB * a["bias_init"] * a["no_clamp"]
                 + seed_effect[s] + rng.normal(0, NOISE))
            diverged = (not a["plain_residual"]) and rng.random() < p_div_off
            cell = " ".join(f"{f}={'on' if a[f] else 'off'}" for f in FACTORS)
            rows.append({"run_id": f"{cell}-{s}", "run_key": f"{cell}-{s}", "cell": cell, "seed": s,
                         "status": "diverged" if diverged else "converged", "roles": "",
                         "final_val_f1": np.nan if diverged else y, "steps": 100.0,
                         "first_nonfinite_step": 40.0 if diverged else np.nan, **a})
    return analysis.prepare(pd.DataFrame(rows))


# True effects in the analysis' conventions (on minus off, averaged over the other factors;
# AB = half the difference of A's effect with B on and with B off).
TRUE_MAIN = {"bias_init": MAIN["bias_init"] + AB / 2, "no_clamp": MAIN["no_clamp"] + AB / 2,
             "plain_residual": 0.0}
TRUE_AB = AB / 2


def test_main_effects_and_interaction_are_recovered_without_noise():
    """Noise-free table: estimates equal the truth exactly and the CIs collapse onto it."""
    global NOISE
    rng = np.random.default_rng(0)
    saved, NOISE = NOISE, 0.0
    try:
        runs = synthetic_runs(rng)
    finally:
        NOISE = saved
    eff = analysis.main_effects(runs, FACTORS, outcomes=["final_val_f1"]).set_index("factor")
    for f, truth in TRUE_MAIN.items():
        assert eff.loc[f, "effect"] == pytest.approx(truth, abs=1e-9)
        assert eff.loc[f, "paired"] and eff.loc[f, "n"] == 4 * 5
    inter = analysis.interactions(runs, FACTORS).set_index(["a", "b"])
    assert inter.loc[("bias_init", "no_clamp"), "effect"] == pytest.approx(TRUE_AB, abs=1e-9)
    assert inter.loc[("bias_init", "plain_residual"), "effect"] == pytest.approx(0.0, abs=1e-9)


def test_confidence_intervals_cover_the_truth_in_the_expected_share():
    """Over 60 noisy repeats the 95% CIs cover each true effect in >= 85% of repeats (a bootstrap
    CI over 20 pairs is slightly narrow; far below 95% would mean a wrong estimator)."""
    rng = np.random.default_rng(1)
    repeats = 60
    cover = {f: 0 for f in TRUE_MAIN}
    cover_ab = 0
    for _ in range(repeats):
        runs = synthetic_runs(rng)
        eff = analysis.main_effects(runs, FACTORS, outcomes=["final_val_f1"]).set_index("factor")
        for f, truth in TRUE_MAIN.items():
            cover[f] += eff.loc[f, "low"] <= truth <= eff.loc[f, "high"]
        inter = analysis.interactions(runs, ["bias_init", "no_clamp"])
        cover_ab += inter.loc[0, "low"] <= TRUE_AB <= inter.loc[0, "high"]
    shares = {f: c / repeats for f, c in cover.items()} | {"AB": cover_ab / repeats}
    assert all(0.85 <= s <= 1.0 for s in shares.values()), shares


def test_divergence_rate_effect_and_f1_of_diverged_runs():
    """Diverged runs are kept: divergence is a rate, and their F1 counts as 0."""
    runs = synthetic_runs(np.random.default_rng(2), seeds=20, p_div_off=0.5)
    off = runs[runs.plain_residual == False]  # noqa: E712
    assert 0 < off["diverged"].mean() < 1
    assert (runs.loc[runs.status == "diverged", "final_val_f1"] == 0).all()
    eff = analysis.main_effects(runs, FACTORS, outcomes=["diverged"]).set_index("factor")
    truth = -off["diverged"].mean()  # the on arm never diverges
    assert eff.loc["plain_residual", "effect"] == pytest.approx(truth, abs=1e-9)
    assert eff.loc["plain_residual", "high"] < 0
    assert eff.loc["bias_init", "low"] <= 0 <= eff.loc["bias_init", "high"]


def test_verdicts_follow_the_evidence():
    """Claims are judged on instability: plain_residual (its arm off diverges half the time, on
    never) is supported; bias_init (divergence in both arms, no change) is inconclusive, even
    though its F1 effect is real; with no divergence anywhere every claim is untested."""
    global NOISE
    saved, NOISE = NOISE, 0.005
    try:
        runs = synthetic_runs(np.random.default_rng(3), seeds=6, p_div_off=0.6)
        calm = synthetic_runs(np.random.default_rng(3), seeds=6)
    finally:
        NOISE = saved
    eff = analysis.main_effects(runs, FACTORS)
    v = analysis.verdicts(eff, runs).set_index("fix")
    assert v.loc["plain_residual", "verdict"] == "supported"
    assert v.loc["bias_init", "verdict"] == "inconclusive"
    assert "/24 vs" in v.loc["plain_residual", "evidence"]
    # the tests a verdict rests on, with their intervals (what `run` prints under each verdict)
    (decisive,) = v.loc["plain_residual", "decisive"]
    assert decisive.startswith("divergence rate: 0/24 vs ") and "[95% CI " in decisive
    assert v.loc["bias_init", "decisive"] == []
    assert "neither confirm nor contradict" in analysis.critical_agreement(v.reset_index())
    v = analysis.verdicts(analysis.main_effects(calm, FACTORS), calm).set_index("fix")
    assert set(v["verdict"]) == {"untested"}
    assert "0/24 vs 0/24" in v.loc["bias_init", "reason"]


def test_unpaired_effect_in_a_fraction():
    """Half of a 2^3 design (the I=ABC fraction): no partners exist, so effects are differences
    of arm means, each equal to the main effect plus its alias."""
    global NOISE
    saved, NOISE = NOISE, 0.0
    try:
        runs = synthetic_runs(np.random.default_rng(4))
    finally:
        NOISE = saved
    s = runs[FACTORS].astype(int) * 2 - 1
    half = runs[(s.prod(axis=1) == 1).to_numpy()]
    eff = analysis.main_effects(half, FACTORS, outcomes=["final_val_f1"]).set_index("factor")
    assert not eff["paired"].any() and len(half) == 20
    # In the I=ABC half (resolution III) A is aliased with BC (zero here), B with AC (zero), and
    # C with AB: C's estimate is C + AB. This is why studies only accept resolution >= IV.
    assert eff.loc["bias_init", "effect"] == pytest.approx(TRUE_MAIN["bias_init"], abs=1e-9)
    assert eff.loc["no_clamp", "effect"] == pytest.approx(TRUE_MAIN["no_clamp"], abs=1e-9)
    assert eff.loc["plain_residual", "effect"] == pytest.approx(TRUE_AB, abs=1e-9)


def test_one_at_a_time_and_ablation_path():
    """OAT deltas pair add:X with broken and fixed with drop:X by seed; the greedy path takes the
    best next fix first."""
    runs = synthetic_runs(np.random.default_rng(5), seeds=3)
    role = {"bias_init=off no_clamp=off plain_residual=off": "broken",
            "bias_init=on no_clamp=off plain_residual=off": "add:bias_init",
            "bias_init=on no_clamp=on plain_residual=on": "fixed",
            "bias_init=off no_clamp=on plain_residual=on": "drop:bias_init"}
    runs["roles"] = runs["cell"].map(role).fillna("")
    oat = analysis.one_at_a_time(runs).set_index("background")
    assert oat.loc["added to broken", "fix"] == "bias_init"
    assert oat.loc["added to broken", "effect"] == pytest.approx(MAIN["bias_init"], abs=0.06)
    assert oat.loc["dropped from fixed", "n"] == 3
    path = analysis.ablation_path(runs, FACTORS)
    assert list(path["flipped"])[1] == "bias_init"  # the largest gain first
    assert len(path) == 4
