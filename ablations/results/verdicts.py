"""The verdict rule: what the data says about each of the seed's claims, and why.

A pure function of named estimates, independent of where they came from (a factorial model, a
paired rate interval, a stability outcome such as the max stable learning rate):

    verdict = judge({"bias_init": [ClaimEstimate("divergence rate", -0.5, -0.8, -0.2, p=0.003,
                                                 better="lower", counts=(0, 8, 4, 8)), ...], ...})

RULE below is the rule in words; reports print it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ablations.results.fragility import LIMIT, fragility, runs_text

ALPHA = 0.05

RULE = (
    "Each claim is judged only on the outcomes it is about (for the seed's fixes: instability, "
    "i.e. the divergence and collapse rates, or, in a study with a stress ladder, the shift of "
    "the edge (LR50) and the rate of runs that failed at and above the recipes' best rung), as "
    "the effect of switching the fix on, separately in each background (added to the broken "
    "recipe; dropped from the fixed one) and regime. A test is *untested* when it cannot reject: "
    "neither arm had a single event (0/n vs 0/n), every run of both arms had it (n/n vs n/n), or "
    "both edges lie past the same end of the ladder; such tests are left out of the multiplicity "
    "correction (Tarone 1990). The p-values of all other tests printed in this report are "
    "adjusted together with Holm's step-down method, each test on its own (never merged by "
    "label). A claim is *supported* when at least one of its tests improves with Holm-adjusted "
    "p < 0.05 (its CI excludes 0 at the corrected level) and none worsens so; *refuted* when at "
    "least one worsens and none improves so; *background-dependent* when it improves in one "
    "background and worsens in another (a finding: the fix helps only where the others are "
    "missing, or only where they are present); *inconclusive* when no adjusted p is below 0.05 "
    "(no effect shown: this is not evidence of no effect), or when outcomes disagree within one "
    "background; *untested* when every test it is about is untested. Each verdict names the "
    "background and regime it rests on. A supported or refuted verdict that rests on rate tests "
    "also gives its fragility (Walsh et al. 2014): the fewest runs whose outcome, changed, would "
    "leave none of those tests significant after the same correction.")


@dataclass(frozen=True)
class ClaimEstimate:
    """One estimate of a claim's effect (fix on minus fix off)."""

    outcome: str  # e.g. "divergence rate", "max stable lr"
    effect: float
    low: float  # 95 % CI
    high: float
    p: float  # two-sided p-value dual to the CI (nan: not testable)
    better: str = "lower"  # "lower" or "higher": the direction that supports the claim
    counts: Optional[tuple[int, int, int, int]] = None  # rates: (events_on, n_on, events_off, n_off)
    method: str = ""
    background: str = ""  # e.g. "added to broken, precision=fp16": where the test was made
    testable: Optional[bool] = None  # set by the caller where counts cannot tell (edges)
    shown: str = ""  # the estimate as printed, where it is not a plain number (censored edges)
    pairs: Optional[tuple[int, int, int, int]] = None  # paired: (both, on_only, off_only, neither)

    @property
    def table(self) -> Optional[tuple[tuple[int, int, int, int], bool]]:
        """(table, paired) of a rate test, for its fragility; None for other tests (edges)."""
        if self.pairs is not None:
            return self.pairs, True
        if self.counts is not None and self.method.startswith("Newcombe hybrid"):
            return self.counts, False
        return None

    @property
    def untested(self) -> bool:
        if self.testable is not None:
            return not self.testable or not math.isfinite(self.p)
        if self.counts is not None:
            on, n_on, off, n_off = self.counts
            return (on == 0 and off == 0) or (on == n_on and off == n_off)
        return not (math.isfinite(self.effect) and math.isfinite(self.p))

    @property
    def label(self) -> str:
        return f"{self.outcome} ({self.background})" if self.background else self.outcome

    def describe(self) -> str:
        c = (f" {self.counts[0]}/{self.counts[1]} vs {self.counts[2]}/{self.counts[3]} runs,"
             if self.counts else "")
        ci = (self.shown if self.shown else
              f"{self.effect:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}]"
              if math.isfinite(self.effect) else "not measured")
        return f"{self.label}:{c} {ci}"


@dataclass(frozen=True)
class Verdict:
    verdict: str  # supported | refuted | background-dependent | inconclusive | untested
    reason: str
    adjusted_p: tuple[Optional[float], ...]  # per estimate, in order; None where untested
    fragility: Optional[int] = None  # supported / refuted on rate tests: runs it hangs on


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def judge(claims: Mapping[str, Sequence[ClaimEstimate]], alpha: float = ALPHA) -> dict[str, Verdict]:
    """Verdict and reason per claim, with Holm's correction across every tested estimate of every
    claim given (one report = one call). Adjusted p-values are kept per estimate, so two tests
    with the same outcome name (two backgrounds, two regimes) never overwrite each other."""
    family = [(name, i) for name, ests in claims.items() for i, e in enumerate(ests)
              if not e.untested]
    adjusted = holm([claims[name][i].p for name, i in family])
    adj: dict[str, list[Optional[float]]] = {name: [None] * len(ests)
                                             for name, ests in claims.items()}
    for (name, i), p in zip(family, adjusted):
        adj[name][i] = p
    out = {}
    m = len(family)
    for name, ests in claims.items():
        if not ests:
            out[name] = Verdict("untested", "no estimate of an outcome the claim is about", ())
            continue
        tested = [(e, adj[name][i]) for i, e in enumerate(ests) if adj[name][i] is not None]
        untested = [e for i, e in enumerate(ests) if adj[name][i] is None]
        if not tested:
            what = "; ".join(f"{e.label} {e.counts[0]}/{e.counts[1]} vs {e.counts[2]}/{e.counts[3]}"
                             if e.counts else f"{e.label} {e.shown or 'not measured'}"
                             for e in untested)
            out[name] = Verdict("untested", f"untested: nothing either arm could differ in "
                                f"({what})", tuple(adj[name]))
            continue
        improves, worsens = [], []
        for e, p in tested:
            if p >= alpha:
                continue
            good = e.effect < 0 if e.better == "lower" else e.effect > 0
            if not math.isfinite(e.effect):  # a censored shift: its interval tells the side
                good = e.low > 0 if e.better == "higher" else e.high < 0
            (improves if good else worsens).append(e)
        if improves and not worsens:
            verdict = "supported"
        elif worsens and not improves:
            verdict = "refuted"
        elif improves and worsens and not ({e.background for e in improves}
                                           & {e.background for e in worsens}):
            verdict = "background-dependent"
        else:
            verdict = "inconclusive"
        parts = [f"{e.describe()}, Holm p {p:.3g}" for e, p in tested]
        parts += [f"{e.describe()} (untested)" for e in untested]
        why = {"supported": "improves", "refuted": "worsens"}.get(verdict)
        if why:
            head = (f"{verdict}: {', '.join(e.label for e in (improves or worsens))} {why} "
                    f"(adjusted p < {alpha:g}, {m} tests)")
        elif verdict == "background-dependent":
            head = (f"background-dependent: improves in {', '.join(e.label for e in improves)}; "
                    f"worsens in {', '.join(e.label for e in worsens)} (adjusted p < {alpha:g}, "
                    f"{m} tests)")
        elif improves and worsens:
            head = "inconclusive: outcomes disagree"
        else:
            head = f"inconclusive: no test differs at adjusted p < {alpha:g} ({m} tests)"
        decisive = [i for i, e in enumerate(ests) if any(e is d for d in improves or worsens)]
        frag = (_fragility(claims, family, decisive, name, alpha)
                if verdict in ("supported", "refuted") else None)
        tail = (f" Fragility: {runs_text(frag)} with the other outcome (failed / not failed) "
                f"would leave none of the tests it rests on significant (Walsh et al. 2014)."
                if frag is not None else "")
        out[name] = Verdict(verdict, head + ". " + "; ".join(parts) + "." + tail,
                            tuple(adj[name]), frag)
    return out


def _fragility(claims: Mapping[str, Sequence[ClaimEstimate]], family: list[tuple[str, int]],
               decisive: Sequence[int], name: str, alpha: float) -> Optional[int]:
    """The fewest runs whose outcome, changed, would leave none of claim `name`'s `decisive`
    tests significant after Holm over the whole family (the other tests' p held fixed). One test
    after the other, weakest first, each starting from the p the previous ones were left at.
    None where a decisive test is not a rate test (an edge shift); LIMIT + 1 where a test needs
    more than LIMIT."""
    ps = [claims[n][i].p for n, i in family]
    where = {key: k for k, key in enumerate(family)}
    total = 0
    for i in sorted(decisive, key=lambda i: -claims[name][i].p):
        est = claims[name][i]
        if est.table is None:
            return None
        k = where[(name, i)]

        def significant(p: float, k: int = k) -> bool:
            return holm(ps[:k] + [p] + ps[k + 1:])[k] < alpha

        n, ps[k] = fragility(*est.table, significant)
        if n is None:
            return LIMIT + 1
        total += n
    return min(total, LIMIT + 1)
