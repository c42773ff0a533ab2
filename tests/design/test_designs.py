"""ablations/design/designs.py: full factorial, one-at-a-time, fractional factorial, run keys."""

import dataclasses
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablations.design import designs
from ablations.design.designs import (KEY_FIELDS_V1, Cell, config_key, describe_fraction,
                                      fractional_factorial, full_factorial, legacy_key,
                                      one_at_a_time, stable_hash)
from ablations.design.fixes import FIXES, fix_overrides
from ablations.design.fractional import (GENERATORS, LETTERS, defining_relation, fractional_generators,
                                  resolution)
from ablations.design.spec import Factor, load_spec, parse_spec
from model.config import PLACE_FIELDS, HighLearningRateWarning, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
FIX_NAMES = list(FIXES)


def fix_factors(k: int) -> tuple[Factor, ...]:
    return tuple(Factor(n, "fix", (False, True)) for n in FIX_NAMES[:k])


def dummy_factors(k: int) -> tuple[Factor, ...]:
    """k two-level factors (any names will do for the design matrix)."""
    return tuple(Factor(f"x{i}", "field", (0, 1)) for i in range(k))


def signs(cells: list[Cell], factors: tuple[Factor, ...]) -> list[list[int]]:
    """Design matrix: -1 at a factor's before/low level, +1 at its after/high level."""
    hi = {f.name: (True if f.kind == "fix" else f.values[1]) for f in factors}
    return [[1 if v == hi[name] else -1 for name, v in c.assignment] for c in cells]


def column(matrix: list[list[int]], cols: tuple[int, ...]) -> list[int]:
    return [math.prod(row[c] for c in cols) for row in matrix]


def dot(a: list[int], b: list[int]) -> int:
    return sum(x * y for x, y in zip(a, b))


def spec_of(factors: dict, design="full_factorial", seeds=2, **extra):
    return parse_spec({"name": "t", "design": design, "factors": factors, "seeds": seeds,
                       **extra}, "t.yaml")


# ---------------------------------------------------------------------------- full factorial
@pytest.mark.parametrize("levels", [[2], [3], [2, 2], [2, 3], [2, 2, 2], [3, 2, 4]])
def test_full_factorial_count_is_product_of_levels(levels):
    factors = tuple(Factor(f"f{i}", "field", tuple(range(n))) for i, n in enumerate(levels))
    cells = full_factorial(factors)
    assert len(cells) == math.prod(levels)
    combos = {tuple(v for _, v in c.assignment) for c in cells}
    assert combos == set(itertools.product(*[range(n) for n in levels]))
    assert all([n for n, _ in c.assignment] == [f.name for f in factors] for c in cells)


def test_full_factorial_spec_runs():
    spec = spec_of({"bias_init": ["off", "on"], "lr": ["1e-4", "2e-4", "3e-4"],
                    "batch_size": [4, 8]}, seeds=3)
    cells = designs.cells(spec)
    assert len(cells) == 2 * 3 * 2
    runs = designs.runs(spec)
    assert len(runs) == 12 * 3
    assert [(r.cell, r.seed) for r in runs] == [(c, s) for c in cells for s in (0, 1, 2)]
    for r in runs:
        v = r.cell.values()
        assert r.config.lr == v["lr"] and r.config.batch_size == v["batch_size"]
        assert r.config.classifier_bias == ((0.0, 0.0) if v["bias_init"] else (0.02, 0.0))
        assert r.config.seed == r.seed


def test_resolve_applies_baseline_base_factor_and_seed():
    spec = spec_of({"layer_norm": ["off", "on"]}, baseline="broken", base={"epochs": 3})
    off, on = designs.cells(spec)
    with pytest.warns(HighLearningRateWarning):
        broken = TrainConfig.from_overrides({**fix_overrides(baseline="broken"), "epochs": 3, "seed": 1})
    assert designs.resolve(spec, off, 1) == broken
    with pytest.warns(HighLearningRateWarning):
        want = TrainConfig.from_overrides({**broken.to_dict(), "norm": "layer"})
    assert designs.resolve(spec, on, 1) == want


# ---------------------------------------------------------------------------- one at a time
def check_one_at_a_time(cells: list[Cell], names: list[str], before: dict, after: dict):
    by_role = {}
    for c in cells:
        for r in c.roles:
            assert r not in by_role, f"role {r} twice"
            by_role[r] = c
    assert set(by_role) == ({"broken", "fixed"} | {f"add:{n}" for n in names}
                            | {f"drop:{n}" for n in names})
    broken, fixed = by_role["broken"].values(), by_role["fixed"].values()
    assert broken == before and fixed == after
    for n in names:
        add, drop = by_role[f"add:{n}"].values(), by_role[f"drop:{n}"].values()
        assert {k for k in add if add[k] != broken[k]} == {n}
        assert add[n] == after[n]
        assert {k for k in drop if drop[k] != fixed[k]} == {n}
        assert drop[n] == before[n]


@pytest.mark.parametrize("k", [3, 4, 5, 6, 8])
def test_one_at_a_time_gives_2k_plus_2_cells(k):
    factors = fix_factors(k)
    cells = one_at_a_time(factors)
    assert len(cells) == 2 * k + 2
    assert len({c.assignment for c in cells}) == len(cells)  # no duplicate cells
    names = [f.name for f in factors]
    check_one_at_a_time(cells, names, {n: False for n in names}, {n: True for n in names})


def test_one_at_a_time_k1_shares_the_end_points():
    cells = one_at_a_time(fix_factors(1))
    assert len(cells) == 2
    roles = {frozenset(c.roles): c.values() for c in cells}
    assert roles == {frozenset({"broken", "drop:bias_init"}): {"bias_init": False},
                     frozenset({"add:bias_init", "fixed"}): {"bias_init": True}}


def test_one_at_a_time_k2_add_and_drop_coincide():
    # with two factors, add:A (A on, B off) is drop:B: 4 distinct cells, every role kept
    cells = one_at_a_time(fix_factors(2))
    assert len(cells) == 4
    check_one_at_a_time(cells, FIX_NAMES[:2], {n: False for n in FIX_NAMES[:2]},
                        {n: True for n in FIX_NAMES[:2]})


def test_one_at_a_time_uses_off_as_before_whatever_the_listed_order():
    factors = (Factor("bias_init", "fix", (True, False)), Factor("no_clamp", "fix", (False, True)),
               Factor("lr", "field", (1e-3, 5e-4)))
    cells = one_at_a_time(factors)
    check_one_at_a_time(cells, ["bias_init", "no_clamp", "lr"],
                        {"bias_init": False, "no_clamp": False, "lr": 1e-3},
                        {"bias_init": True, "no_clamp": True, "lr": 5e-4})


def test_shipped_one_at_a_time_end_points_are_the_recipes():
    spec = load_spec(ROOT / "studies" / "one_at_a_time.yaml")
    cells = designs.cells(spec)
    assert len(cells) == 2 * 8 + 2
    broken = next(c for c in cells if "broken" in c.roles)
    fixed = next(c for c in cells if "fixed" in c.roles)
    with pytest.warns(HighLearningRateWarning):
        want = TrainConfig.from_overrides({**fix_overrides(baseline="broken"), "seed": 2})
    assert designs.resolve(spec, broken, 2) == want
    assert designs.resolve(spec, fixed, 2) == TrainConfig(seed=2)


# ----------------------------------------------------------------------- fractional factorial
def brute_force_resolution(matrix: list[list[int]]) -> int:
    """Length of the shortest set of columns whose product is constant (a word of I = ...)."""
    k = len(matrix[0])
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            if len(set(column(matrix, cols))) == 1:
                return r
    return k + 1  # full factorial: no word


def test_fractional_6_2_is_resolution_iv():
    factors = fix_factors(6)
    cells = fractional_factorial(factors, 2)
    assert len(cells) == 16
    m = signs(cells, factors)
    assert len({tuple(r) for r in m}) == 16
    mains = [column(m, (i,)) for i in range(6)]
    for col in mains:  # balanced
        assert col.count(1) == 8 and col.count(-1) == 8
    for a, b in itertools.combinations(range(6), 2):  # main effects orthogonal
        assert dot(mains[a], mains[b]) == 0
    for i in range(6):  # resolution IV: main effects clear of two-factor interactions
        for a, b in itertools.combinations([j for j in range(6) if j != i], 2):
            assert dot(mains[i], column(m, (a, b))) == 0, (i, a, b)
    # ... but not resolution V: some two-factor interactions are aliased with each other
    twofi = {p: column(m, p) for p in itertools.combinations(range(6), 2)}
    assert any(abs(dot(twofi[p], twofi[q])) == 16 for p, q in itertools.combinations(twofi, 2))
    assert resolution(6, 2) == 4 == brute_force_resolution(m)


def test_fractional_5_1_is_resolution_v():
    factors = dummy_factors(5)
    cells = fractional_factorial(factors, 1)
    assert len(cells) == 16
    m = signs(cells, factors)
    assert resolution(5, 1) == 5 == brute_force_resolution(m)
    assert fractional_generators(5, 1) == ["ABCD"]
    effects = [column(m, c) for r in (1, 2) for c in itertools.combinations(range(5), r)]
    for a, b in itertools.combinations(effects, 2):  # mains and 2FIs all mutually orthogonal
        assert dot(a, b) == 0


@pytest.mark.parametrize("kp", sorted(GENERATORS), ids=lambda kp: f"2^({kp[0]}-{kp[1]})")
def test_every_generator_entry_has_resolution_at_least_iv(kp):
    k, p = kp
    assert resolution(k, p) >= 4
    factors = dummy_factors(k)
    cells = fractional_factorial(factors, p)
    m = signs(cells, factors)
    assert len(m) == 2 ** (k - p) and len({tuple(r) for r in m}) == len(m)
    assert brute_force_resolution(m) == resolution(k, p)
    assert len(defining_relation(k, p)) == 2 ** p - 1
    assert all(set(w) <= set(LETTERS[:k]) for w in defining_relation(k, p))
    # generators use only base letters
    assert all(set(g) <= set(LETTERS[:k - p]) for g in GENERATORS[kp])


@pytest.mark.parametrize("k", [4, 5, 6, 7, 8])
def test_half_fractions_have_resolution_k(k):
    assert resolution(k, 1) == k


def test_fractional_refusals():
    with pytest.raises(ValueError, match="resolution III"):
        fractional_generators(3, 1)
    with pytest.raises(ValueError, match=r"2\^\(5-2\)"):
        fractional_generators(5, 2)
    with pytest.raises(ValueError, match="fraction p"):
        fractional_generators(6, 6)
    with pytest.raises(ValueError):
        fractional_generators(6, 0)


def test_fractional_maps_minus_one_to_first_value_of_a_field():
    factors = (Factor("lr", "field", (1e-3, 5e-4)),) + fix_factors(4)[1:] + (
        Factor("batch_size", "field", (8, 4)),)
    cells = fractional_factorial(factors, 1)
    assert {c.values()["lr"] for c in cells} == {1e-3, 5e-4}
    m = signs(cells, factors)
    # column of the last factor = product of the others (I = ABCDE)
    assert all(row[-1] == math.prod(row[:-1]) for row in m)
    base_rows = [tuple(r[:4]) for r in m]
    assert sorted(base_rows) == sorted(itertools.product((-1, 1), repeat=4))


def test_describe_fraction_names_generators_and_factors():
    factors = fix_factors(6)
    text = describe_fraction(factors, 2)
    assert text.startswith("2^(6-2) resolution IV: ")
    assert "E=ABC" in text and "F=BCD" in text
    for letter, f in zip("ABCDEF", factors):
        assert f"{letter}={f.name}" in text
    text = describe_fraction(dummy_factors(5), 1)
    assert "resolution V" in text and "E=ABCD" in text


def test_shipped_fractional_study():
    spec = load_spec(ROOT / "studies" / "seed_fixes_fractional.yaml")
    cells = designs.cells(spec)
    assert len(cells) == 16
    assert len(designs.runs(spec)) == 48
    full = {c.assignment for c in designs.cells(load_spec(ROOT / "studies" / "seed_fixes.yaml"))}
    assert {c.assignment for c in cells} <= full


def test_search_design_has_no_fixed_cells():
    spec = load_spec(ROOT / "studies" / "lr_clip_search.yaml")
    with pytest.raises(ValueError, match="sampled"):
        designs.cells(spec)


# ------------------------------------------------------------------------------ run keys
def test_run_keys_stable_and_distinct():
    spec = load_spec(ROOT / "studies" / "quick.yaml")
    runs1, runs2 = designs.runs(spec), designs.runs(load_spec(ROOT / "studies" / "quick.yaml"))
    keys = [r.run_key for r in runs1]
    assert keys == [r.run_key for r in runs2]
    assert len(set(keys)) == len(keys) == 18  # distinct across seeds and cells (stress rungs too)
    assert all(len(k) == 12 and int(k, 16) >= 0 for k in keys)
    for r in runs1:
        assert r.run_key == config_key(r.config) == config_key(designs.resolve(spec, r.cell, r.seed))
    by_cell = {}
    for r in runs1:
        by_cell.setdefault(r.cell.cell_id, set()).add(r.run_key)
    assert len(by_cell) == 6 and all(len(v) == 3 for v in by_cell.values())


def test_run_key_depends_only_on_the_resolved_config():
    a = spec_of({"layer_norm": ["off", "on"], "lr": ["1e-4", "3e-4"]})
    b = spec_of({"lr": ["3e-4", "1e-4"], "layer_norm": ["on", "off"]})  # other order, same runs
    assert {r.run_key for r in designs.runs(a)} == {r.run_key for r in designs.runs(b)}
    c = spec_of({"layer_norm": ["off", "on"], "lr": ["1e-4", "3e-4"]}, base={"epochs": 3})
    assert not {r.run_key for r in designs.runs(a)} & {r.run_key for r in designs.runs(c)}


def test_run_keys_stable_across_processes():
    code = ("from ablations.design import designs; from ablations.design.spec import load_spec; "
            "print(','.join(r.run_key + ':' + r.cell.cell_id for r in "
            "designs.runs(load_spec('studies/quick.yaml'))))")
    outs = set()
    for hashseed in ("1", "2"):
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONHASHSEED": hashseed})
        assert p.returncode == 0, p.stderr
        outs.add(p.stdout.strip())
    spec = load_spec(ROOT / "studies" / "quick.yaml")
    here = ",".join(r.run_key + ":" + r.cell.cell_id for r in designs.runs(spec))
    assert outs == {here}


def test_cell_id_stable_and_distinct():
    a = Cell((("layer_norm", True), ("lr", 1e-4)))
    b = Cell((("layer_norm", True), ("lr", 1e-4)), roles=("fixed",))
    assert a.cell_id == b.cell_id == Cell((("layer_norm", True), ("lr", 0.0001))).cell_id
    assert len(a.cell_id) == 10
    assert a.cell_id != Cell((("layer_norm", False), ("lr", 1e-4))).cell_id
    assert a.cell_id != Cell((("layer_norm", True), ("lr", 3e-4))).cell_id
    t = Cell((("classifier_bias", (0.0, 0.0)),))
    assert t.cell_id == Cell((("classifier_bias", (0.0, 0.0)),)).cell_id
    spec = load_spec(ROOT / "studies" / "seed_fixes.yaml")
    ids = [c.cell_id for c in designs.cells(spec)]
    assert len(set(ids)) == 64 and ids == [c.cell_id for c in designs.cells(spec)]


def test_cell_label():
    factors = (Factor("layer_norm", "fix", (False, True)), Factor("lr", "field", (1e-4, 1e-3)))
    assert Cell((("layer_norm", True), ("lr", 1e-4))).label(factors) == "layer_norm=on lr=0.0001"


def test_where_a_run_happens_is_not_what_it_is():
    assert set(designs.PLACE_V1) == set(PLACE_FIELDS)  # every place field has its V1 value
    base = TrainConfig(seed=3, lr=3e-4)
    elsewhere = [dataclasses.replace(base, device=d, cache_dir=c)
                 for d in ("auto", "cpu", "cuda", "cuda:1") for c in (None, "/tmp/features")]
    assert {config_key(c) for c in elsewhere} == {config_key(base)}
    # a key issued at V1's defaults is unchanged: V1's hash of every field it knew, as it did
    defaults = TrainConfig().to_dict()
    v1 = stable_hash({k: v for k, v in base.to_dict().items()
                      if k in KEY_FIELDS_V1 or v != defaults[k]})[:12]
    assert config_key(base) == v1
    # a run keyed with its own device (a study file that set one) keeps that key as its legacy
    cpu = dataclasses.replace(base, device="cpu")
    assert legacy_key(cpu) != config_key(cpu)
    assert legacy_key(cpu) == stable_hash({k: v for k, v in cpu.to_dict().items()
                                           if k in KEY_FIELDS_V1 or v != defaults[k]})[:12]
    assert legacy_key(base) == config_key(base)

