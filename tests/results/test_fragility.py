"""The fragility index of a verdict (Walsh et al. 2014): the greedy search against the exhaustive
minimum on every small table, Holm's level, and the runs it is computed from."""

from __future__ import annotations

import pandas as pd
import pytest

from ablations.results import analysis, backgrounds, rates, stability
from ablations.results.fragility import exhaustive, fragility, neighbours
from ablations.results.verdicts import ClaimEstimate, holm, judge

from tests.results.test_backgrounds import lay_of, oat_runs


def paired_tables(max_n: int):
    for n in range(1, max_n + 1):
        for b in range(n + 1):
            for o in range(n + 1 - b):
                for f in range(n + 1 - b - o):
                    yield (b, o, f, n - b - o - f)


@pytest.mark.parametrize("level", [0.05, 0.05 / 20])
def test_greedy_finds_the_exhaustive_minimum_on_every_small_table(level):
    """Every paired table of up to 8 pairs and every two-arm table of up to 5 runs an arm, at
    the plain level and at a Holm level of 20 tests."""
    def sig(p):
        return p < level

    for t in paired_tables(8):
        assert fragility(t, True, sig)[0] == exhaustive(t, True, sig), t
    for n1 in range(1, 6):
        for n0 in range(1, 6):
            for x1 in range(n1 + 1):
                for x0 in range(n0 + 1):
                    t = (x1, n1, x0, n0)
                    assert fragility(t, False, sig)[0] == exhaustive(t, False, sig), t


def test_the_index_is_the_distance_to_the_nearest_non_significant_table():
    """0/9 vs 9/9 pairs (the main job's divergence test): 4 changed runs undo it, 3 never do."""
    def sig(p):
        return p < 0.05

    k, p = fragility((0, 0, 9, 0), True, sig)
    assert k == 4 and p >= 0.05
    ring = {(0, 0, 9, 0)}
    for _ in range(3):
        ring |= {u for t in ring for u in neighbours(t, True)}
    assert all(rates.paired_p(*t) < 0.05 for t in ring)
    assert fragility((0, 3, 0, 9), True, sig) == (0, rates.paired_p(0, 3, 0, 9))  # not significant


def test_one_run_moves_one_pair_and_keeps_the_counts_whole():
    for t in paired_tables(4):
        for u in neighbours(t, True):
            assert sum(u) == sum(t) and min(u) >= 0
            assert sum(abs(a - b) for a, b in zip(t, u)) == 2
            # exactly one arm's event count moved by one
            on = (u[0] + u[1]) - (t[0] + t[1])
            off = (u[0] + u[2]) - (t[0] + t[2])
            assert sorted([abs(on), abs(off)]) == [0, 1]


def _paired(pairs, background="added to broken"):
    b, o, f, n = pairs
    rd_p = rates.paired_p(*pairs)
    return ClaimEstimate("divergence rate", (o - f) / sum(pairs), -1, 1, rd_p, "lower",
                         (b + o, sum(pairs), b + f, sum(pairs)), "Newcombe paired score",
                         background, pairs=pairs)


def test_verdict_fragility_uses_holms_level_and_adds_up_over_its_tests():
    alone = judge({"x": [_paired((0, 0, 9, 0))]})["x"]
    assert alone.verdict == "supported" and alone.fragility == 4
    assert "Fragility: 4 runs with the other outcome" in alone.reason
    # among 20 other tests (p 0.5), the level is Holm's: fewer runs undo it
    noise = [ClaimEstimate("collapse rate", 0.0, -0.2, 0.2, 0.5) for _ in range(20)]
    crowded = judge({"x": [_paired((0, 0, 9, 0))], "y": noise})["x"]
    ps = [rates.paired_p(0, 0, 9, 0)] + [0.5] * 20
    want = fragility((0, 0, 9, 0), True, lambda p: holm([p] + ps[1:])[0] < 0.05)[0]
    assert crowded.fragility == want < 4
    # two decisive tests: both must fall. Holm: the first needs p >= 0.05 (the other, smaller,
    # is rank 1), then the second only p >= 0.025 (rank 1 of 2): 4 + 3 runs
    two = judge({"x": [_paired((0, 0, 9, 0)), _paired((0, 0, 9, 0), "dropped from fixed")]})["x"]
    first = fragility((0, 0, 9, 0), True, lambda p: p < 0.05)[0]
    second = fragility((0, 0, 9, 0), True, lambda p: 2 * p < 0.05)[0]
    assert (first, second) == (4, 3) and two.fragility == 7


def test_no_fragility_where_a_verdict_rests_on_an_edge_or_is_not_one():
    edge = ClaimEstimate("edge shift (log10 LR50)", 2.0, 1.0, 3.0, 0.001, "higher",
                         testable=True)
    assert judge({"x": [edge]})["x"].fragility is None
    weak = judge({"x": [_paired((0, 1, 2, 6))]})["x"]
    assert weak.verdict == "inconclusive" and weak.fragility is None
    assert "Fragility" not in weak.reason


def test_unpaired_rate_tests_count_runs_per_arm():
    rd = rates.rate_diff_indep(0, 12, 10, 12)
    e = ClaimEstimate("divergence rate", rd.diff, rd.low, rd.high, rd.p, "lower",
                      (0, 12, 10, 12), rd.method)
    v = judge({"x": [e]})["x"]
    assert v.verdict == "supported"
    assert v.fragility == exhaustive((0, 12, 10, 12), False, lambda p: p < 0.05)


def test_runs_to_verdict_carry_their_pairs():
    """From runs: the per-background rate tests and the stability effects keep each test's pairs
    (private columns, not printed), and the verdict's fragility is computed from them."""
    stable = {"broken": 0.0, "add:bias_init": 10.0, "drop:bias_init": 0.0, "fixed": 10.0}
    runs = oat_runs(stable, seeds=5)  # the fix makes every rung stable
    tests = backgrounds.rate_tests(runs, ["bias_init"], ["lr", "precision"], axis="lr")
    row = tests[(tests.outcome == "collapsed") & (tests.background == "added to broken")].iloc[0]
    assert row["_pairs"] == (0, 0, 25, 0) and row["counts"] == "0/25 vs 25/25"
    assert "_pairs" not in backgrounds.public(tests)
    eff = stability.fix_effects(runs, lay_of(runs))
    unstable = eff[eff.outcome == "unstable_rate"]
    assert all(isinstance(p, tuple) and sum(p) == n for p, n in zip(unstable["_pairs"],
                                                                     unstable["n"]))
    claims = analysis.claim_estimates(runs, ["bias_init", "lr", "precision"],
                                      ["lr", "precision"], eff)
    on_edge = judge(claims)["bias_init"]  # the edges (censored, > +4) are decisive too
    assert on_edge.verdict == "supported" and on_edge.fragility is None
    # no stress ladder (one rung): judged on the rates alone, paired by seed
    one = oat_runs(stable, seeds=5, ladder=(1e-3,))
    claims = analysis.claim_estimates(one, ["bias_init"], [])
    assert [e.pairs for e in claims["bias_init"] if e.label.startswith("collapse")] == \
        [(0, 0, 5, 0)] * 2
    f1 = pd.DataFrame({"factor": ["bias_init"], "outcome": ["final_val_f1"],
                       "contrast": ["added to broken"], "effect": [0.6], "low": [0.5],
                       "high": [0.7]})
    v = analysis.verdicts(f1, one, claims).set_index("fix")
    assert v.loc["bias_init", "verdict"] == "supported"
    ps = [e.p for e in claims["bias_init"] if not e.untested]
    first = fragility((0, 0, 5, 0), True, lambda p: holm([p] + ps[1:])[0] < 0.05)[0]
    assert v.loc["bias_init", "fragility"] == judge(claims)["bias_init"].fragility >= first >= 1


def test_a_verdict_past_the_search_limit_reads_more_than_it():
    from ablations.results.fragility import LIMIT, runs_text

    big = _paired((0, 0, 120, 0))  # 0/120 vs 120/120 pairs
    v = judge({"x": [big]})["x"]
    assert v.fragility == LIMIT + 1 and f"more than {LIMIT} runs" in v.reason
    assert runs_text(1) == "one run" and runs_text(3) == "3 runs"
