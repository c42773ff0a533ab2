"""The verdict rule: what the data says about each of the seed's claims, and why.

A pure function of named estimates, independent of where they came from (a factorial model, a
paired rate interval, a stability outcome such as the max stable learning rate):

    verdict = judge({"bias_init": [Estimate("divergence rate", -0.5, -0.8, -0.2, p=0.003,
                                            better="lower", counts=(0, 8, 4, 8)), ...], ...})

RULE below is the rule in words; reports print it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

ALPHA = 0.05

RULE = (
    "Each claim is judged only on the outcomes it is about (for the seed's fixes: instability, "
    "i.e. the divergence and collapse rates, and stability outcomes where the study has them), "
    "as the effect of switching the fix on. An outcome is *untested* when neither arm had a "
    "single event (0/n vs 0/n): the data cannot show that a fix prevents what never happened, "
    "and such outcomes are left out of the multiplicity correction (they cannot reject; Tarone "
    "1990). The p-values of all tested outcomes of all claims in this report are adjusted "
    "together with Holm's step-down method. A claim is *supported* when at least one of its "
    "outcomes improves with Holm-adjusted p < 0.05 (its CI excludes 0 at the corrected level) "
    "and none worsens so; *refuted* when at least one worsens with adjusted p < 0.05 and none "
    "improves so; *inconclusive* when no adjusted p is below 0.05 (no effect shown: this is not "
    "evidence of no effect), or when outcomes disagree; *untested* when every outcome it is about "
    "is untested.")


@dataclass(frozen=True)
class Estimate:
    """One estimate of a claim's effect (fix on minus fix off)."""

    outcome: str  # e.g. "divergence rate", "max stable lr"
    effect: float
    low: float  # 95 % CI
    high: float
    p: float  # two-sided p-value dual to the CI (nan: not testable)
    better: str = "lower"  # "lower" or "higher": the direction that supports the claim
    counts: Optional[tuple[int, int, int, int]] = None  # rates: (events_on, n_on, events_off, n_off)
    method: str = ""

    @property
    def untested(self) -> bool:
        if self.counts is not None:
            return self.counts[0] == 0 and self.counts[2] == 0
        return not (math.isfinite(self.effect) and math.isfinite(self.p))

    def describe(self) -> str:
        c = (f" {self.counts[0]}/{self.counts[1]} vs {self.counts[2]}/{self.counts[3]} runs,"
             if self.counts else "")
        ci = (f"{self.effect:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}]"
              if math.isfinite(self.effect) else "not measured")
        return f"{self.outcome}:{c} {ci}"


@dataclass(frozen=True)
class Verdict:
    verdict: str  # supported | refuted | inconclusive | untested
    reason: str
    adjusted_p: dict[str, float]  # outcome -> Holm-adjusted p (tested outcomes only)


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


def judge(claims: Mapping[str, Sequence[Estimate]], alpha: float = ALPHA) -> dict[str, Verdict]:
    """Verdict and reason per claim, with Holm's correction across every tested estimate of every
    claim given (one report = one call)."""
    family = [(name, e) for name, ests in claims.items() for e in ests if not e.untested]
    adjusted = holm([e.p for _, e in family])
    adj_by: dict[str, dict[str, float]] = {name: {} for name in claims}
    for (name, e), p in zip(family, adjusted):
        adj_by[name][e.outcome] = p
    out = {}
    m = len(family)
    for name, ests in claims.items():
        if not ests:
            out[name] = Verdict("untested", "no estimate of an outcome the claim is about", {})
            continue
        tested = [e for e in ests if not e.untested]
        untested = [e for e in ests if e.untested]
        if not tested:
            what = "; ".join(f"{e.outcome} {e.counts[0]}/{e.counts[1]} vs {e.counts[2]}/{e.counts[3]}"
                             if e.counts else f"{e.outcome} not measured" for e in untested)
            out[name] = Verdict("untested", f"untested: no instability in either arm ({what})", {})
            continue
        improves, worsens = [], []
        for e in tested:
            if adj_by[name][e.outcome] >= alpha:
                continue
            good = e.effect < 0 if e.better == "lower" else e.effect > 0
            (improves if good else worsens).append(e)
        if improves and not worsens:
            verdict = "supported"
        elif worsens and not improves:
            verdict = "refuted"
        else:
            verdict = "inconclusive"
        parts = [f"{e.describe()}, Holm p {adj_by[name][e.outcome]:.3g}" for e in tested]
        parts += [f"{e.describe()} (untested: no event in either arm)" for e in untested]
        why = {"supported": "improves", "refuted": "worsens"}.get(verdict)
        head = (f"{verdict}: {', '.join(e.outcome for e in (improves or worsens))} {why} "
                f"(adjusted p < {alpha:g}, {m} tests)" if why else
                "inconclusive: outcomes disagree" if improves and worsens else
                f"inconclusive: no outcome differs at adjusted p < {alpha:g} ({m} tests)")
        out[name] = Verdict(verdict, head + ". " + "; ".join(parts) + ".", adj_by[name])
    return out
