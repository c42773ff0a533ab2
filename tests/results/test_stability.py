"""Stability outcomes on hand-made tables with known answers, and stress factors in study files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablations.results import stability
from ablations.design.spec import SpecError, parse_spec
from ablations.results.stability import layout, lr_sensitivity, max_stable

INF, NAN = math.inf, math.nan


# ------------------------------------------------------------------------ LR sensitivity
def test_lr_sensitivity_by_hand():
    """mean(min(l, l0) - l*): losses 0.3, 0.5, 0.9 (capped at l0 = 0.7) -> (0 + 0.2 + 0.4) / 3."""
    assert lr_sensitivity([0.3, 0.5, 0.9], 0.7) == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_lr_sensitivity_counts_nonfinite_as_init_loss(bad):
    """A diverged rung (NaN, +inf, -inf) counts as l0: 0.3, 0.5, l0=0.7 -> (0 + 0.2 + 0.4) / 3."""
    assert lr_sensitivity([0.3, 0.5, bad], 0.7) == pytest.approx(0.2)


def test_lr_sensitivity_single_rung_is_zero():
    assert lr_sensitivity([0.4], 0.7) == 0.0


def test_lr_sensitivity_all_rungs_failing_is_undefined():
    """Never below l0: the formula would say 0 (least sensitive); we say undefined."""
    assert math.isnan(lr_sensitivity([NAN, INF, NAN], 0.7))
    assert math.isnan(lr_sensitivity([0.9, 1.5], 0.7))
    assert math.isnan(lr_sensitivity([], 0.7))


def test_lr_sensitivity_nonfinite_init_loss_falls_back_to_ln2():
    assert lr_sensitivity([0.3, NAN], NAN) == pytest.approx((0 + math.log(2) - 0.3) / 2)


def test_max_stable():
    assert max_stable([1e-3, 1e-2, 1e-1, 1.0], [True, True, False, False]) == 1e-2
    # not monotone (a low rung that collapsed): the largest stable rung counts
    assert max_stable([1e-3, 1e-2, 1e-1], [False, True, False]) == 1e-2
    assert max_stable([1e-3], [True]) == 1e-3
    assert math.isnan(max_stable([1e-3, 1e-2], [False, False]))


# ------------------------------------------------------------------------ tables
def _runs(edges: dict[tuple[str, bool], list[float]], ladder=(1e-3, 1e-2, 1e-1, 1.0)) -> pd.DataFrame:
    """A factorial-style table: fix `clip` off/on in regime precision fp32/fp16; per (regime,
    clip) the rung per seed above which runs diverge."""
    rows = []
    for (prec, on), per_seed_edge in edges.items():
        for seed, edge in enumerate(per_seed_edge):
            for lr in ladder:
                ok = lr <= edge
                rows.append({"cell": f"clip={'on' if on else 'off'} lr={lr:g} precision={prec}",
                             "seed": seed, "clip": on, "lr": lr, "precision": prec, "roles": "",
                             "status": "converged" if ok else "diverged",
                             "final_val_loss": 0.4 + lr if ok else NAN, "init_loss": 0.7,
                             "nonfinite_events": 0 if ok else 1,
                             "first_nonfinite_step": NAN if ok else 3.0,
                             "first_nonfinite_where": "" if ok else "stem.conv:forward"})
    return pd.DataFrame(rows)


def test_per_seed_and_recipe_tables_by_hand():
    runs = _runs({("fp32", False): [1e-2, 1e-2, 1e-1], ("fp32", True): [1e-1, 1.0, 1e-1],
                  ("fp16", False): [1e-1, 1e-1, 1e-1], ("fp16", True): [0.0, 0.0, 0.0]})
    lay = layout(runs, ["clip", "lr", "precision"], ["lr", "precision"])
    assert lay.axis == "lr" and lay.regime == ("precision",) and lay.design == ("clip",)
    table = stability.recipe_table(runs, lay).set_index(["recipe", "regime"])
    assert table.loc[("clip=off", "precision=fp32"), "max_stable_lr"] == 1e-2  # every seed
    assert table.loc[("clip=on", "precision=fp32"), "max_stable_lr"] == 1e-1
    assert math.isnan(table.loc[("clip=on", "precision=fp16"), "max_stable_lr"])
    assert table.loc[("clip=on", "precision=fp16"), "failed"] == "12/12"
    rates = stability.rung_rates(runs, lay)
    r = rates[(rates.recipe == "clip=off") & (rates.regime == "precision=fp32") & (rates.lr == 1e-1)]
    assert r.diverged.item() == 2 and r.runs.item() == 3

    assert table.loc[("clip=on", "precision=fp16"), "runs"] == "12 of 12"
    assert table.loc[("clip=on", "precision=fp16"), "LR50 [95% CI]"] == "stable at no rung (< 0.001)"
    # fp32 off: seeds' edges in (0.01, 0.1], (0.01, 0.1], (0.1, 1]: LR50 inside the ladder
    lr50 = table.loc[("clip=off", "precision=fp32")]
    assert 1e-2 < 10 ** lr50["lr50_log10"] < 1e-1 and math.isfinite(lr50["lr50_high"])

    eff = stability.fix_effects(runs, lay)
    es = eff[(eff.outcome == "edge_shift")].set_index("regime")
    assert set(eff.background) == {"-"}  # a factorial table: one background, no other fix
    # fp32: off (0.01, 0.1] x2, (0.1, 1]; on (0.1, 1] x2 and one seed stable at every rung:
    # about a decade, and 3 seeds a side cannot exclude 0
    e32 = es.loc["precision=fp32"]
    assert e32["effect"] == pytest.approx(1.0, abs=0.05)
    assert e32["low"] < 0 < e32["high"] < 3 and e32["shown"].startswith("+1.0 [")
    # fp16 on: stable at no rung: its edge lies below the ladder, the shift is bounded above
    e16 = es.loc["precision=fp16"]
    assert e16["low"] == -math.inf and e16["high"] < -1 and e16["shown"].startswith("< ")
    # unstable rate 12/12 on vs 3/12 off: Newcombe's interval excludes 0; in fp32 it does not
    hurt = stability.hurts(eff)
    assert set(hurt.regime) == {"precision=fp16"}
    assert set(hurt.outcome) == {"edge_shift", "unstable_rate"}
    fr = eff[(eff.outcome == "unstable_rate")].set_index("regime")
    assert fr.loc["precision=fp16", "effect"] == pytest.approx(0.75)
    assert fr.loc["precision=fp16", "low"] > 0

    places = stability.first_nonfinite(runs, lay)
    assert "stem.conv:forward" in places.iloc[0]["where"]


def test_rate_interval_is_honest_at_zero_of_n():
    """0/12 vs 0/12: no failure in either arm, and still an interval of about +-0.24."""
    lo, hi = stability.rate_diff_interval(0, 12, 0, 12)
    assert lo < -0.2 and hi > 0.2 and lo == pytest.approx(-hi)


def test_one_at_a_time_roles_give_add_and_drop_contrasts():
    rows = []
    for role, edge in {"broken": 1e-3, "add:bias_init": 1e-2, "fixed": 1e-1,
                       "drop:bias_init": 1e-2}.items():
        for seed in range(3):
            for lr in (1e-3, 1e-2, 1e-1, 1.0):
                ok = lr <= edge
                rows.append({"cell": f"x lr={lr:g}", "seed": seed, "lr": lr, "roles": role,
                             "bias_init": role in ("fixed", "add:bias_init"),
                             "status": "converged" if ok else "collapsed",
                             "final_val_loss": 0.5 if ok else 0.69, "init_loss": 0.7,
                             "nonfinite_events": 0})
    runs = pd.DataFrame(rows)
    lay = layout(runs, ["bias_init", "lr"], ["lr"])
    eff = stability.fix_effects(runs, lay)
    es = eff[eff.outcome == "edge_shift"].set_index("background")
    # every seed fails between the same two rungs (separation): the shift is one decade in both
    # backgrounds, and the interval spans about a rung either side
    for bgd in ("added to broken", "dropped from fixed"):
        assert es.loc[bgd, "effect"] == pytest.approx(1.0, abs=0.03)
        assert -0.5 < es.loc[bgd, "low"] < 0.5 < 1.5 < es.loc[bgd, "high"] < 2.5
    assert set(es["backgrounds"]) == {"agree"}


# ------------------------------------------------------------------------ stress in specs
BASE = {"name": "s", "design": "one_at_a_time", "factors": {"bias_init": ["off", "on"],
                                                           "layer_norm": ["off", "on"]},
        "seeds": 2}


def test_stress_factors_are_crossed_with_every_cell():
    from ablations.design import designs

    spec = parse_spec({**BASE, "stress": {"lr": ["1e-3", 1e-2, 0.1], "precision": ["fp32", "fp16"]}})
    assert [f.name for f in spec.design_factors] == ["bias_init", "layer_norm"]
    assert [f.name for f in spec.stress_factors] == ["lr", "precision"]
    assert spec.stress_factors[0].values == (1e-3, 1e-2, 0.1)  # YAML's "1e-3" string coerced
    cells = designs.cells(spec)
    n_design = len(designs.one_at_a_time(spec.design_factors))
    assert len(cells) == n_design * 3 * 2
    assert all(c.roles for c in cells)  # one-at-a-time roles survive the crossing
    cfgs = {(r.config.lr, r.config.precision) for r in designs.runs(spec)}
    assert len(cfgs) == 6


@pytest.mark.parametrize("stress, message", [
    ({"lr": [1e-3, "fast"]}, "stress.lr: must be a number, got 'fast'"),
    ({"precision": ["fp32", "fp8"]}, "stress.precision: must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"lr": [1e-3]}, "stress.lr: takes a list of at least two values"),
    ({"lr": {"low": 1e-3, "high": 1}}, "stress.lr: takes a list of values (a ladder)"),
    ({"bias_init": ["off", "on"]}, "stress.bias_init: is a fix"),
    ({"norm": ["layer", "batch"]}, "stress.norm: sets norm, which factor layer_norm already sets"),
    ({"feature_scale": [1, -1]}, "stress.feature_scale: value -1: feature_scale: must be a finite number > 0"),
    ({"warp": [1, 2]}, "stress.warp: not a fix or config field"),
    ([1, 2], "stress: must be a mapping"),
])
def test_stress_factors_validated_like_factors(stress, message):
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "stress": stress}, "x.yaml")
    assert message in str(e.value) and str(e.value).startswith("x.yaml: ")


def test_stress_conflicts_with_base_and_search():
    with pytest.raises(SpecError, match="stress.lr: sets lr, which base also sets"):
        parse_spec({**BASE, "base": {"lr": 1e-3}, "stress": {"lr": [1e-3, 1e-2]}}, "x.yaml")
    with pytest.raises(SpecError, match="stress: is crossed with a designed set of cells"):
        parse_spec({**BASE, "design": {"type": "search"}, "budget": {"trials": 2},
                    "stress": {"lr": [1e-3, 1e-2]}}, "x.yaml")


def test_shipped_stress_studies_parse():
    from pathlib import Path

    from ablations.design import designs
    from ablations.design.spec import load_spec

    root = Path(__file__).resolve().parents[2] / "studies"
    for name in ("stability_frontier.yaml", "seed_symptom.yaml"):
        spec = load_spec(root / name)
        assert spec.stress_factors
        lrs = [v for f in spec.stress_factors if f.name == "lr" for v in f.values]
        if name == "stability_frontier.yaml":
            assert max(lrs) / min(lrs) >= 1e4  # at least four orders of magnitude
            assert len(spec.seeds) == 3
        assert designs.runs(spec)


def test_one_at_a_time_rates_use_the_pairs_only():
    """Broken-side recipes collapse, fixed-side ones do not, and fix x changes nothing within its
    pairs (broken vs add:x, drop:x vs fixed). Pooling the arms would credit x with the difference
    between the two sides; the pairs show none."""
    from ablations.design import designs
    from ablations.results import rates
    from ablations.design.spec import parse_spec

    spec = parse_spec({"name": "o", "design": "one_at_a_time", "seeds": 3,
                       "factors": {f: ["off", "on"] for f in ("bias_init", "no_clamp", "clip_0_5",
                                                              "layer_norm")}})
    rows = []
    for cell in designs.cells(spec):
        v = cell.values()
        broken_side = sum(v.values()) <= 1  # broken and add:*
        for seed in spec.seeds:
            rows.append({**v, "seed": seed, "collapsed": float(broken_side)})
    runs = pd.DataFrame(rows)
    rd = rates.rate_difference(runs, "bias_init", "collapsed", ["no_clamp", "clip_0_5",
                                                                 "layer_norm"])
    assert rd.paired and rd.n_on == 6 and rd.diff == 0.0
    assert rd.low < 0 < rd.high
