"""Designs: which cells (combinations of factor values) a study trains.

A cell is one combination; a run is cell x seed; a run's key is a stable hash of its resolved
TrainConfig, so the same run always has the same key whatever study or launch enqueues it.

  full_factorial        every combination of every factor's values
  one_at_a_time         add-one-in from the "before" state of every factor (for fixes: the broken
                        recipe) and leave-one-out from the "after" state (the fixed recipe); the
                        two end points are shared: 2k + 2 cells for k >= 3 two-level factors
                        (fewer for k <= 2, where add-one-in and leave-one-out cells coincide)
  fractional_factorial  2^(k-p) two-level design from the minimum-aberration generators of
                        Box, Hunter & Hunter (Montgomery, Table 8.14); only designs of resolution
                        >= IV are allowed, so main effects are not aliased with two-factor
                        interactions (the generator tables: fractional.py)
  search                cells sampled by Optuna (TPE or random); sampled in ablations/engine/trial.py
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass
from typing import Any

from ablations.design.fractional import LETTERS, fractional_generators, resolution, sign_rows
from ablations.design.spec import Factor, StudySpec
from model.config import HighLearningRateWarning, TrainConfig
from model.recipe import recipe_for

@dataclass(frozen=True)
class Cell:
    """One combination of factor values; `roles` says what a one-at-a-time cell stands for."""

    assignment: tuple[tuple[str, Any], ...]  # ((factor name, value), ...) in factor order
    roles: tuple[str, ...] = ()

    @property
    def cell_id(self) -> str:
        return stable_hash([[k, _jsonable(v)] for k, v in self.assignment])[:10]

    def values(self) -> dict[str, Any]:
        return dict(self.assignment)

    def label(self, factors: tuple[Factor, ...]) -> str:
        """Readable: 'layer_norm=on no_clamp=off lr=0.001'."""
        by_name = {f.name: f for f in factors}
        return " ".join(f"{k}={by_name[k].label(v)}" for k, v in self.assignment)


@dataclass(frozen=True)
class PlannedRun:
    """One training run: a cell at one seed, with its resolved config."""

    cell: Cell
    seed: int
    config: Any  # the recipe's config (TrainConfig for the chorus CNN)

    @functools.cached_property  # (a launch reads it several times per run: 10 000-run plans)
    def run_key(self) -> str:
        return config_key(self.config)

    @functools.cached_property
    def legacy_key(self) -> str:
        """The key this run had before device and cache_dir left a run's identity (= run_key
        unless the study file set one of them): a resumed study's runs count under either."""
        return legacy_key(self.config, self.run_key)


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# The TrainConfig fields that existed when run keys were first issued (keys hash all of them).
# A field added later enters a key only where it differs from its default, and a new field's
# default must reproduce the behaviour from before it existed: so an upgrade that adds a field
# leaves every existing key, and every finished run of a resumed study, as it was.
KEY_FIELDS_V1 = frozenset((
    "anomaly_mode", "batch_size", "cache_dir", "chorus_labels", "classifier_bias", "data_dir",
    "data_seed", "data_source", "device", "dropout", "epochs", "forensics", "frame_rate", "frames",
    "grad_clip", "hidden_dim", "hop_length", "input_norm", "kernel_size", "lead_up", "lr",
    "n_blocks", "n_features", "n_fft", "n_songs", "nonfinite", "norm", "optimizer", "param_clamp",
    "residual_scale", "rollback_every", "sample_rate", "seed", "skip_bad_tracks", "spike_action",
    "spike_factor", "spike_window", "steps_per_epoch", "structures", "val_fraction",
    "weight_decay"))
_DEFAULTS: dict[str, Any] = {}


# Where a run happens is not what it is (model.config.PLACE_FIELDS): the device and the feature
# cache enter every key at the values V1 hashed by default, so a key issued at those defaults
# (every shipped study's: the device came from `auto` or --device) stays as it was.
PLACE_V1 = {"device": "auto", "cache_dir": None}  # one value for each of PLACE_FIELDS


def config_key(cfg: Any) -> str:
    """Stable id of a resolved config: 12 hex digits of a SHA-256 of its canonical JSON. The
    chorus CNN's (TrainConfig): over the KEY_FIELDS_V1 fields (device and cache_dir at PLACE_V1)
    plus each later field that differs from its default, so its keys are those issued before
    recipes existed. Any other recipe's: its name and every field but where the run happens."""
    if type(cfg) is not TrainConfig:
        return stable_hash({"recipe": recipe_for(cfg).name,
                            **{k: v for k, v in cfg.to_dict().items() if k not in PLACE_V1}})[:12]
    return _key({**cfg.to_dict(), **PLACE_V1})


def legacy_key(cfg: Any, key: str | None = None) -> str:
    """The key before device and cache_dir left the identity: their own values hashed. `key`:
    config_key(cfg), returned as is where the two agree (no second hash)."""
    if type(cfg) is not TrainConfig or all(getattr(cfg, k) == v for k, v in PLACE_V1.items()):
        return key if key is not None else config_key(cfg)
    return _key(cfg.to_dict())


def _key(d: dict[str, Any]) -> str:
    if not _DEFAULTS:
        _DEFAULTS.update(TrainConfig().to_dict())
    return stable_hash({k: v for k, v in d.items()
                        if k in KEY_FIELDS_V1 or v != _DEFAULTS[k]})[:12]


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------------------- designs
def full_factorial(factors: tuple[Factor, ...]) -> list[Cell]:
    return [Cell(tuple(zip([f.name for f in factors], combo)))
            for combo in itertools.product(*[f.values for f in factors])]


def _before_after(f: Factor) -> tuple[Any, Any]:
    """For a fix: off then on, whatever order the file lists. For a field: as listed."""
    if f.kind == "fix":
        return False, True
    return f.values[0], f.values[1]


def one_at_a_time(factors: tuple[Factor, ...]) -> list[Cell]:
    names = [f.name for f in factors]
    before = [_before_after(f)[0] for f in factors]
    after = [_before_after(f)[1] for f in factors]
    cells: dict[tuple, list[str]] = {}

    def add(values: list[Any], role: str) -> None:
        cells.setdefault(tuple(zip(names, values)), []).append(role)

    add(before, "broken")
    for i, name in enumerate(names):
        add(before[:i] + [after[i]] + before[i + 1:], f"add:{name}")
    add(after, "fixed")
    for i, name in enumerate(names):
        add(after[:i] + [before[i]] + after[i + 1:], f"drop:{name}")
    return [Cell(assign, tuple(roles)) for assign, roles in cells.items()]


def fractional_factorial(factors: tuple[Factor, ...], p: int) -> list[Cell]:
    """Rows of the 2^(k-p) design; factor i takes values[0] at -1 and values[1] at +1."""
    cells = []
    for row in sign_rows(len(factors), p):
        assign = []
        for f, sign in zip(factors, row):
            lo, hi = _before_after(f)
            assign.append((f.name, hi if sign > 0 else lo))
        cells.append(Cell(tuple(assign)))
    return cells


def describe_fraction(factors: tuple[Factor, ...], p: int) -> str:
    """e.g. '2^(6-2) resolution IV: E=ABC, F=BCD (A=bias_init, ...)'."""
    k = len(factors)
    gens = fractional_generators(k, p)
    roman = {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}
    res = resolution(k, p)
    gen_text = ", ".join(f"{LETTERS[k - p + i]}={g}" for i, g in enumerate(gens))
    names = ", ".join(f"{LETTERS[i]}={f.name}" for i, f in enumerate(factors))
    return f"2^({k}-{p}) resolution {roman.get(res, res)}: {gen_text} ({names})"


def cells(spec: StudySpec) -> list[Cell]:
    """The cells of a non-search design, each crossed with every combination of the stress
    factors (stress values last in the assignment, the design's roles kept)."""
    factors = spec.design_factors
    if spec.design == "full_factorial":
        design = full_factorial(factors)
    elif spec.design == "one_at_a_time":
        design = one_at_a_time(factors)
    elif spec.design == "fractional_factorial":
        design = fractional_factorial(factors, spec.fraction)
    else:
        raise ValueError(f"design {spec.design!r} has no fixed cells (cells are sampled)")
    stress = spec.stress_factors
    if not stress:
        return design
    return [Cell(c.assignment + s.assignment, c.roles)
            for c in design for s in full_factorial(stress)]


def resolve(spec: StudySpec, cell: Cell, seed: int) -> Any:
    """The config (the recipe's class) of a cell at a seed: baseline fixes, base overrides, factor values, seed."""
    overrides = dict(spec.base_config_overrides())
    by_name = {f.name: f for f in spec.factors}
    for name, value in cell.assignment:
        overrides.update(by_name[name].overrides(value))
    overrides["seed"] = seed
    with warnings.catch_warnings():  # the lr warning is for interactive use, not per cell
        warnings.simplefilter("ignore", HighLearningRateWarning)
        return spec.config_class.from_overrides(overrides, where=f"{spec.source}: cell "
                                                                 f"{cell.label(spec.factors)}: ")


def runs(spec: StudySpec) -> list[PlannedRun]:
    """Every run of a non-search design, cell-major then seed."""
    return [PlannedRun(c, s, resolve(spec, c, s)) for c in cells(spec) for s in spec.seeds]
