"""Two-level fractional factorial designs: the generator tables and the sign matrix.

A 2^(k-p) design runs 1/2^p of the 2^k combinations of k two-level factors: the first k-p
factors (letters A, B, ...) take every combination of -1/+1, and each of the p added factors is
the product of the base columns its generator word names. Only the minimum-aberration designs
of resolution >= IV from Box, Hunter & Hunter (Montgomery, Table 8.14) are offered, so main
effects are not aliased with two-factor interactions.

Pure tables and arithmetic on letters: `spec.py` (to check a study file's fraction) and
`designs.py` (to build the cells) both read it, and it imports neither.
"""

from __future__ import annotations

import itertools

LETTERS = "ABCDEFGHJKLMNOPQRSTUVWXYZ"  # I is skipped: it names the identity in a defining relation

# (k, p) -> generators of the added factors, in base-factor letters (minimum aberration,
# resolution >= IV only). For p = 1 the last factor is the product of all others (resolution k).
GENERATORS: dict[tuple[int, int], list[str]] = {
    (6, 2): ["ABC", "BCD"],
    (7, 2): ["ABCD", "ABDE"],
    (7, 3): ["ABC", "BCD", "ACD"],
    (8, 2): ["ABCD", "ABEF"],
    (8, 3): ["ABC", "ABD", "BCDE"],
    (8, 4): ["BCD", "ACD", "ABC", "ABD"],
    (9, 2): ["ACDFG", "BCEFG"],
    (9, 3): ["ABCD", "ACEF", "CDEF"],
    (9, 4): ["BCDE", "ACDE", "ABDE", "ABCE"],
    (10, 3): ["ABCG", "BCDE", "ACDF"],
    (10, 4): ["BCDF", "ACDF", "ABDE", "ABCE"],
    (10, 5): ["ABCD", "ABCE", "ABDE", "ACDE", "BCDE"],
}


def fractional_generators(k: int, p: int) -> list[str]:
    """Generator words (in base letters) of a 2^(k-p) design with resolution >= IV."""
    if k < 4:
        raise ValueError(f"a fractional factorial needs at least 4 two-level factors "
                         f"(a 2^(3-1) design has resolution III), got {k}")
    if p < 1 or p >= k:
        raise ValueError(f"fraction p must be in 1..{k - 1} for {k} factors, got {p}")
    if p == 1:
        return [LETTERS[:k - 1]]
    if (k, p) not in GENERATORS:
        ok = sorted(pp for (kk, pp) in GENERATORS if kk == k)
        raise ValueError(f"no resolution >= IV 2^({k}-{p}) design; for {k} factors use fraction in "
                         f"{[1] + ok}")
    return GENERATORS[(k, p)]


def defining_relation(k: int, p: int) -> list[str]:
    """All words of the defining relation I = ..., each as a sorted string of factor letters."""
    gens = fractional_generators(k, p)
    base = k - p
    words = [frozenset(g) | {LETTERS[base + i]} for i, g in enumerate(gens)]
    out = set()
    for r in range(1, p + 1):
        for combo in itertools.combinations(words, r):
            w = frozenset()
            for x in combo:
                w = w ^ x
            out.add("".join(sorted(w)))
    return sorted(out, key=lambda w: (len(w), w))


def resolution(k: int, p: int) -> int:
    return min(len(w) for w in defining_relation(k, p))


def sign_rows(k: int, p: int) -> list[tuple[int, ...]]:
    """The 2^(k-p) rows of the design, each a -1/+1 sign per factor A, B, ... in order."""
    gens = fractional_generators(k, p)
    base = k - p
    rows = []
    for signs in itertools.product((-1, 1), repeat=base):
        col = dict(zip(LETTERS[:base], signs))
        for i, g in enumerate(gens):
            s = 1
            for letter in g:
                s *= col[letter]
            col[LETTERS[base + i]] = s
        rows.append(tuple(col[LETTERS[i]] for i in range(k)))
    return rows
