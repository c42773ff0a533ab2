"""Do the report's intervals keep their stated coverage at the seed counts users run?

Planted truths, simulated many times, analysed by the report's own functions:

  1. paired F1 differences at 3 and 6 seeds: the t interval (backgrounds.paired_t) against the
     BCa bootstrap it replaced, for normal and for skewed seed-to-seed noise;
  2. the edge: seeds' edges drawn from Normal(mu, sigma) in log10 lr, observed on a ladder one
     decade apart (a run fails above its seed's edge); the LR50-shift interval's coverage
     (edges.shift), its power to detect a one-decade shift at 3 and 5 seeds, and that an edge past
     the ladder is never printed as a number;
  3. opposite effects in the two backgrounds: how often the report flags them, and how often it
     does so when the fix does nothing;
  4. missing runs: a randomly dropped run is never counted as stable;
  5. the seed-cluster bootstrap of a factorial fit, shown beside the t intervals only with 10 or
     more seeds: its coverage at 3 and at 10 seeds (long version only).

    python benchmarks/coverage.py            # the long version (a few minutes), a table per check
    python benchmarks/coverage.py --quick    # the sizes the tests use (tests/results/test_coverage.py)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.results import backgrounds, edges, stability  # noqa: E402

LADDER = [-3.0, -2.0, -1.0, 0.0, 1.0]  # log10 lr 1e-3 .. 10, as stability_frontier.yaml


# ------------------------------------------------------------------------------ 1. paired F1
def paired_noise(rng: np.random.Generator, kind: str, size) -> np.ndarray:
    """Seed-to-seed noise of a paired F1 difference (sd 0.05): normal, or right-skewed (a
    centred gamma with shape 2, skewness 1.4: a few seeds that gain much more than the rest)."""
    if kind == "normal":
        return rng.normal(0.0, 0.05, size)
    g = rng.gamma(2.0, 1.0, size)
    return (g - 2.0) / math.sqrt(2.0) * 0.05


def paired_coverage(seeds: int, repeats: int, kind: str = "normal", method: str = "t",
                    truth: float = 0.1, seed: int = 0) -> float:
    """Share of repeats whose 95 % interval of the mean paired difference covers the truth."""
    rng = np.random.default_rng(seed)
    d = truth + paired_noise(rng, kind, (repeats, seeds))
    hit = 0
    for row in d:
        if method == "t":
            m = backgrounds.paired_t(row)
            lo, hi = m.low, m.high
        else:
            lo, hi = _bca(row)
        hit += lo <= truth <= hi
    return hit / repeats


def _bca(x: np.ndarray) -> tuple[float, float]:
    """The interval the report used before: scipy's BCa bootstrap of the mean."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = stats.bootstrap((x,), np.mean, n_resamples=999, method="BCa",
                             rng=np.random.default_rng(0)).confidence_interval
    return float(ci.low), float(ci.high)


# ------------------------------------------------------------------------------ 2. the edge
def draw_edges(rng: np.random.Generator, mu: float, sigma: float, n: int) -> list[edges.Interval]:
    """n seeds' edges from Normal(mu, sigma), seen on LADDER: a run fails at and above its edge."""
    out = []
    for e in rng.normal(mu, sigma, n):
        out.append(edges.seed_interval(LADDER, [x < e for x in LADDER], LADDER[0]))
    return out


def shift_trials(seeds: int, sigma: float, delta: float, repeats: int, seed: int = 0
                 ) -> dict[str, float]:
    """Coverage of the LR50-shift interval and the share of repeats that exclude 0 (power where
    delta != 0, false positives where delta == 0). The off recipe's LR50 is drawn uniformly over
    the ladder's inside, so every phase of the edge against the rungs is met."""
    rng = np.random.default_rng(seed)
    cover = reject = 0
    for _ in range(repeats):
        mu = rng.uniform(-2.5, -0.5)
        e = edges.shift(draw_edges(rng, mu, sigma, seeds), draw_edges(rng, mu + delta, sigma,
                                                                        seeds), LADDER)
        cover += e.low <= delta <= e.high
        reject += (e.low > 0) or (e.high < 0)
    return {"coverage": cover / repeats, "reject": reject / repeats}


def censored_never_a_number(repeats: int, seed: int = 0) -> tuple[int, int]:
    """(censored cases met, of which printed as a number): the on recipe's edges lie past the top
    rung for most seeds; whenever every seed is stable at every rung, both its LR50 and the shift
    must print as a bound."""
    rng = np.random.default_rng(seed)
    met = numbers = 0
    for _ in range(repeats):
        off = draw_edges(rng, rng.uniform(-2.5, -0.5), 0.5, 3)
        on = draw_edges(rng, 2.5, 0.5, 3)
        if not all(math.isinf(i.high) for i in on):
            continue
        met += 1
        loc, sh = edges.fmt_location(edges.lr50(on, LADDER), "lr"), edges.fmt_shift(
            edges.shift(off, on, LADDER))
        numbers += not (loc.startswith(">") and (sh.startswith(">") or sh.startswith("not")))
    return met, numbers


# ------------------------------------------------------------------------------ 3. backgrounds
def opposite_rate(p: dict[str, float], repeats: int, seeds: int = 3, seed: int = 0) -> float:
    """Share of simulated one-at-a-time studies (5 rungs x `seeds`, failure probability per role
    `p`) in which the report flags the fix's two backgrounds as 'opposite'."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(repeats):
        rows = []
        for role, prob in p.items():
            for s in range(seeds):
                for lr in LADDER:
                    rows.append({"roles": role, "seed": s, "lr": lr,
                                 "bias_init": role in ("add:x", "fixed"),
                                 "collapsed": float(rng.random() < prob)})
        t = backgrounds.rate_tests(pd.DataFrame(rows).rename(columns={"bias_init": "x"}), ["x"],
                                   ["lr"], outcomes=("collapsed",), axis="lr")
        hits += (t["backgrounds"] == "opposite").all()
    return hits / repeats


# ------------------------------------------------------------------------------ 4. missing runs
def missing_never_stable(repeats: int, seed: int = 0) -> int:
    """Drop one run at random from a recipe that fails above lr 0.1; return how many times the
    max stable lr (per recipe, over seeds) or a seed's edge read above the truth."""
    rng = np.random.default_rng(seed)
    wrong = 0
    lrs = [10 ** x for x in LADDER]
    for _ in range(repeats):
        rows = [{"roles": "", "cell": f"lr={lr:g}", "seed": s, "lr": lr, "x": True,
                 "status": "converged" if lr <= 0.1 else "collapsed", "final_val_loss": 0.5,
                 "init_val_loss": 0.7, "nonfinite_events": 0}
                for s in range(3) for lr in lrs]
        runs = pd.DataFrame(rows).drop(index=int(rng.integers(len(rows))))
        lay = stability.layout(runs, ["x", "lr"], ["lr"])
        t = stability.recipe_table(runs, lay)
        ps = stability.per_seed(runs, lay)
        wrong += int((t["max_stable_lr"] > 0.1 + 1e-12).any() or (ps["edge_low"] > -1).any())
    return wrong


# ------------------------------------------------------------------------------ 5. cluster bootstrap
def cluster_bootstrap_coverage(seeds: int, repeats: int, seed: int = 0) -> tuple[float, float]:
    """(bootstrap, t) coverage of the main effect of A in a replicated 2^3 factorial fit
    (effects.factorial_fit), true effect +0.05 (on minus off), a seed effect (sd 0.03) shared by a seed's runs
    and run noise (sd 0.05)."""
    import itertools

    from ablations.results import effects

    rng = np.random.default_rng(seed)
    cells = list(itertools.product([False, True], repeat=3))
    boot = t = 0
    for _ in range(repeats):
        rows = []
        for s in range(seeds):
            u = rng.normal(0, 0.03)
            for a, b, c in cells:
                rows.append({"a": a, "b": b, "c": c, "seed": s,
                             "y": 0.5 + 0.05 * a + 0.02 * b + u + rng.normal(0, 0.05)})
        fit = effects.factorial_fit(pd.DataFrame(rows), ["a", "b", "c"], "y",
                                    seed=int(rng.integers(1 << 30)))
        r = fit.table.set_index("term").loc["a"]
        t += r["low"] <= 0.05 <= r["high"]
        if "boot_low" in fit.table:
            boot += r["boot_low"] <= 0.05 <= r["boot_high"]
        else:  # below BOOT_MIN_SEEDS the report does not compute it: compute it here anyway
            from ablations.results.effects import _design_matrix, _seed_bootstrap, coded
            X = _design_matrix(coded(pd.DataFrame(rows), ["a", "b", "c"]),
                               [frozenset(w) for w in (["a"], ["b"], ["c"], ["a", "b"],
                                                       ["a", "c"], ["b", "c"])], ["a", "b", "c"])
            df = pd.DataFrame(rows)
            lo, hi, _, _ = _seed_bootstrap(df["y"].to_numpy(), X, df["seed"].to_numpy(), 0)
            boot += lo[0] <= 0.05 <= hi[0]
    return boot / repeats, t / repeats


# ------------------------------------------------------------------------------ the tables
def main(quick: bool) -> None:
    r_paired, r_edge = (500, 150) if quick else (4000, 1000)
    t0 = time.perf_counter()
    print(f"1. Paired F1 differences: coverage of the nominal 95 % interval ({r_paired} repeats; "
          f"truth +0.10, seed-to-seed sd 0.05)")
    print(f"{'seeds':>5} {'noise':>7} {'t (now)':>8} {'BCa (before)':>13}")
    for n in (3, 6):
        for kind in ("normal", "skewed"):
            t = paired_coverage(n, r_paired, kind, "t")
            b = paired_coverage(n, min(r_paired, 1000), kind, "bca")
            print(f"{n:>5} {kind:>7} {t:>8.3f} {b:>13.3f}")
    print(f"\n2. The edge: LR50-shift interval, seeds' edges ~ Normal(mu, sigma) in log10 lr, rungs "
          f"a decade apart ({r_edge} repeats each)")
    print(f"{'seeds':>5} {'sigma':>6} {'shift':>6} {'coverage':>9} {'excludes 0':>11}")
    for n in (3, 5):
        for sigma in (0.3, 0.7, 1.0):
            for delta in (0.0, 1.0):
                r = shift_trials(n, sigma, delta, r_edge, seed=int(100 * sigma + 10 * n + delta))
                print(f"{n:>5} {sigma:>6.1f} {delta:>+6.1f} {r['coverage']:>9.3f} "
                      f"{r['reject']:>11.3f}")
    print("   ('excludes 0' at shift +1.0 is the power to detect a one-decade shift; at 0, the "
          "false-positive rate)")
    met, numbers = censored_never_a_number(r_edge * 2)
    print(f"   censored edges met: {met}, printed as a number: {numbers}")
    r_bg = 100 if quick else 400
    opp = opposite_rate({"broken": 0.8, "add:x": 0.1, "drop:x": 0.1, "fixed": 0.8}, r_bg)
    none = opposite_rate({"broken": 0.4, "add:x": 0.4, "drop:x": 0.4, "fixed": 0.4}, r_bg)
    print(f"\n3. Opposite effects in the two backgrounds (3 seeds x 5 rungs, {r_bg} repeats): "
          f"flagged 'opposite' in {opp:.1%} where the fix cuts failures 80 % -> 10 % added to "
          f"broken and raises them 10 % -> 80 % dropped from fixed; in {none:.1%} where it does "
          f"nothing")
    miss = missing_never_stable(50 if quick else 300)
    print(f"\n4. A missing run counted as stable: {miss} times in {50 if quick else 300} studies "
          f"with one run dropped at random")
    if not quick:
        print("\n5. A replicated 2^3 factorial, main effect +0.05 (seed effect sd 0.03, noise sd "
              "0.05), 200 repeats: coverage of the seed-cluster bootstrap vs the model's t interval")
        for n in (3, 10):
            b, tc = cluster_bootstrap_coverage(n, 200, seed=n)
            print(f"   {n:>2} seeds: bootstrap {b:.3f}, t {tc:.3f}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the sizes the tests use")
    main(ap.parse_args().quick)
