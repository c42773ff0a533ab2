"""How many runs a verdict hangs on: the fragility index (Walsh et al. 2014, J Clin Epidemiol
67:622) of the runner's rate tests.

A significant rate difference with 3 seeds can rest on one or two runs. The fragility index is
the fewest runs whose outcome (failed / not failed) would have to change for the test to stop
being significant. Walsh et al. defined it for a two-arm trial with Fisher's exact test, adding
events to the arm with fewer; here the test is the one the verdict used (Newcombe's paired or
independent score interval, `rates`), at the level Holm's correction asks of it, and a run of
either arm may change.

Why the runner reports it: `stability_frontier.yaml`, re-run with the same maths and another
floating-point rounding (channels-last convolutions and fused Adam), gave 37 of 480 runs another
status (converged <-> collapsed, at high lr) and moved two verdicts across Holm's line (README,
"Stability under stress"). A verdict of fragility 1 or 2 says that can happen.

Search: greedy, each step the one-run change that raises p most (ties: the one that brings the
estimate nearest 0). tests/results/test_fragility.py checks it against the exhaustive minimum
(breadth-first search) on every table up to a size.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Callable, Optional

from ablations.results import rates

LIMIT = 50  # changes searched per test; a verdict past it reads "more than 50 runs"

Table = tuple[int, int, int, int]
"""Paired: (both, on_only, off_only, neither) pairs. Independent: (x_on, n_on, x_off, n_off)."""

# One run of a pair changes its outcome: the pair moves between kinds. The run with the factor
# on moves both <-> off_only and on_only <-> neither; the run with it off moves both <-> on_only
# and off_only <-> neither.
_PAIR_MOVES = ((0, 2), (2, 0), (1, 3), (3, 1), (0, 1), (1, 0), (2, 3), (3, 2))


def neighbours(table: Table, paired: bool) -> list[Table]:
    """The tables one changed run away."""
    if paired:
        out = []
        for src, dst in _PAIR_MOVES:
            if table[src] > 0:
                t = list(table)
                t[src] -= 1
                t[dst] += 1
                out.append((t[0], t[1], t[2], t[3]))
        return out
    x1, n1, x0, n0 = table
    return ([(x1 + d, n1, x0, n0) for d in (-1, 1) if 0 <= x1 + d <= n1]
            + [(x1, n1, x0 + d, n0) for d in (-1, 1) if 0 <= x0 + d <= n0])


@lru_cache(maxsize=4096)
def p_value(table: Table, paired: bool) -> float:
    return rates.paired_p(*table) if paired else rates.indep_p(*table)


def _estimate(table: Table, paired: bool) -> float:
    if paired:
        n = sum(table)
        return (table[1] - table[2]) / n if n else 0.0
    x1, n1, x0, n0 = table
    return x1 / n1 - x0 / n0


def runs_text(n: int) -> str:
    """A fragility in words: 'one run', '4 runs', 'more than 50 runs' (past LIMIT)."""
    return "one run" if n == 1 else f"more than {LIMIT} runs" if n > LIMIT else f"{n} runs"


def fragility(table: Table, paired: bool, significant: Callable[[float], bool],
              limit: int = LIMIT) -> tuple[Optional[int], float]:
    """(changes, p after them): the fewest one-run changes after which `significant(p)` is false,
    0 if it already is; (None, p) where `limit` changes were not enough."""
    p, k = p_value(table, paired), 0
    while significant(p):
        cands = neighbours(table, paired)
        if k == limit or not cands:
            return None, p
        p, _, table = max((p_value(t, paired), -abs(_estimate(t, paired)), t) for t in cands)
        k += 1
    return k, p


def exhaustive(table: Table, paired: bool, significant: Callable[[float], bool],
               limit: int = LIMIT) -> Optional[int]:
    """The exact minimum by breadth-first search (for tests: it visits every table in reach)."""
    seen, queue = {table}, deque([(table, 0)])
    while queue:
        t, k = queue.popleft()
        if not significant(p_value(t, paired)):
            return k
        if k == limit:
            continue
        for u in neighbours(t, paired):
            if u not in seen:
                seen.add(u)
                queue.append((u, k + 1))
    return None
