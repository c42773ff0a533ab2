"""StudySpec: a YAML study file, validated.

    name: quick                     # Optuna study and MLflow experiment name
    description: ...                # shown on the MLflow experiment
    design: full_factorial          # | one_at_a_time | {type: fractional_factorial, fraction: 1/4}
                                    # | {type: search, sampler: tpe|random}
    factors:                        # a named fix (see `runner.py fixes`) takes [off, on];
      layer_norm: [off, on]         # any TrainConfig field takes a list of values, or for
      lr: [1e-4, 1e-3]              # search designs a range {low, high, log}
    seeds: 3                        # a count (0..n-1) or a list of seeds
    baseline: fixed                 # state of the fixes that are not factors: fixed | broken
    stress:                         # optional: TrainConfig fields crossed with the design's
      lr: [1e-3, 1e-2, 1e-1, 1]     # cells, the axis along which stability is measured
      precision: [fp32, fp16]       # (see ablations/results/stability.py); not for search designs
    base: {epochs: 4}               # TrainConfig overrides for every run
    recipe: chorus_cnn              # the model family (`runner.py recipes`), or your own:
                                    # package.module:ATTR or path/to/file.py:ATTR
    objective: {metric: final_val_f1, direction: maximize}
    budget: {trials: 20, minutes: 30}   # optional; trials is required for search designs
    retries: 2                      # attempts after an exception (a diverged run is a result)

Every error names the file, the key path, the value and what is allowed. YAML 1.1 reads `1e-4`
as a string: values are coerced to the TrainConfig field's type (so "1e-4" becomes 0.0001) or
refused; nothing trains with a string.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ablations.design.fractional import fractional_generators
from model.chorus_cnn import RECIPE as CHORUS_CNN
from model.config import PLACE_FIELDS, ConfigError, HighLearningRateWarning, coerce_field
from model.recipe import Fix, Recipe, RecipeError, load

DESIGNS = ("full_factorial", "one_at_a_time", "fractional_factorial", "search")
SAMPLERS = ("tpe", "random")
TOP_KEYS = ("name", "description", "design", "factors", "stress", "seeds", "baseline", "base",
            "objective", "budget", "retries", "recipe")
# Outcome metrics a study can optimise, their natural direction, and the value a run gets when
# the metric could not be measured because training diverged (F1 of a model that outputs NaN:
# it predicts no chorus frame, so 0; a loss or norm: +inf).
OBJECTIVES: dict[str, tuple[str, float]] = {
    "final_val_f1": ("maximize", 0.0),
    "best_val_f1": ("maximize", 0.0),
    "final_val_accuracy": ("maximize", 0.0),
    "final_val_loss": ("minimize", math.inf),
    "max_grad_norm": ("minimize", math.inf),
}


class SpecError(ValueError):
    """A bad study file; the message is one line naming file, key path, value and what is allowed."""


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Factor:
    """A named fix (values False/True = off/on) or a TrainConfig field; a `stress` factor is a
    field crossed with the design (the axis along which stability is measured, not a fix)."""

    name: str
    kind: str  # "fix" | "field"
    values: tuple[Any, ...] = ()  # levels; empty for a range
    range: Optional[Range] = None
    stress: bool = False
    fix: Optional[Fix] = field(default=None, compare=False, repr=False)  # the recipe's, for a fix

    def overrides(self, value: Any) -> dict[str, Any]:
        """Config fields this factor sets at `value`."""
        if self.kind == "fix":
            fix = self.fix if self.fix is not None else CHORUS_CNN.fix_map[self.name]
            return fix.values(bool(value))
        return {self.name: value}

    def label(self, value: Any) -> str:
        if self.kind == "fix":
            return "on" if value else "off"
        return format_value(value)


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    design: str
    factors: tuple[Factor, ...]
    seeds: tuple[int, ...]
    baseline: str = "fixed"
    base: dict[str, Any] = field(default_factory=dict)
    objective_metric: str = "final_val_f1"
    direction: str = "maximize"
    fraction: int = 0  # p of a 2^(k-p) design
    sampler: str = "tpe"
    trials: Optional[int] = None
    minutes: Optional[float] = None
    retries: int = 2
    source: str = ""
    recipe: Recipe = field(default=CHORUS_CNN, compare=False, repr=False)

    @property
    def config_class(self) -> type:
        return self.recipe.config

    @property
    def design_factors(self) -> tuple[Factor, ...]:
        """The factors the design is built from (`factors:`); `factors` also holds the stress ones."""
        return tuple(f for f in self.factors if not f.stress)

    @property
    def stress_factors(self) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if f.stress)

    def base_config_overrides(self) -> dict[str, Any]:
        """Fix states from the baseline, then the study's base overrides."""
        return {**self.recipe.overrides(baseline=self.baseline), **self.base}

    def diverged_value(self) -> float:
        """Objective value of a run whose metric is NaN (diverged): the worst possible."""
        worst = OBJECTIVES[self.objective_metric][1]
        if self.direction != OBJECTIVES[self.objective_metric][0]:
            worst = -worst if math.isinf(worst) else math.inf
        return worst


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        where = f"on line {first} twice" if first == again else f"on lines {first} and {again}"
        super().__init__(f"duplicate key {key!r} {where} (in the same mapping); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keys must be unique in a mapping; PyYAML keeps the last one silently (a second `lr`
    in `base` would win unseen). This loader refuses the file instead, naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error below
                continue
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> StudySpec:
    """Read and validate a study file. `overrides` replaces top-level keys (tests shrink studies)."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise SpecError(f"{where}: no such study file") from None
    except _DuplicateKey as e:
        raise SpecError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{where}:{at} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a study file is a mapping of {', '.join(TOP_KEYS)}")
    if overrides:
        raw = {**raw, **overrides}
    return parse_spec(raw, where)


def parse_spec(raw: dict[str, Any], where: str = "<study>") -> StudySpec:
    with warnings.catch_warnings():  # validating lr=1e-3 cells is not training at 1e-3
        warnings.simplefilter("ignore", HighLearningRateWarning)
        return _parse_spec(raw, where)


def _parse_spec(raw: dict[str, Any], where: str) -> StudySpec:
    def err(key: str, msg: str) -> SpecError:
        return SpecError(f"{where}: {key}: {msg}")

    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise err(str(unknown[0]), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    for key in ("name", "design", "factors", "seeds"):
        if key not in raw:
            raise err(key, "missing (required keys: name, design, factors, seeds)")

    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise err("name", f"must be letters, digits, '_', '-', '.', got {name!r}")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise err("description", f"must be text, got {description!r}")

    # recipe: the model family whose fixes and config the rest of the file names
    recipe_ref = raw.get("recipe", None)
    if recipe_ref is not None and not (isinstance(recipe_ref, str) and recipe_ref.strip()):
        raise err("recipe", f"must be a recipe name or package.module:ATTR / file.py:ATTR, got "
                            f"{recipe_ref!r}")
    try:
        rec = load(recipe_ref, Path(where).parent if where != "<study>" else None)
    except RecipeError as e:
        raise SpecError(f"{where}: {e}") from None
    fixes, cfg_cls = rec.fix_map, rec.config
    cls_name = f"{rec.name} ({cfg_cls.__name__})"

    def coerce(name: str, value: Any) -> Any:
        if name not in cfg_cls.field_names():
            raise ConfigError(f"{name}: unknown field of {cls_name}; allowed: "
                              f"{', '.join(cfg_cls.field_names())}")
        return coerce_field(name, value, cls=cfg_cls)

    # design
    design_raw = raw["design"]
    design_opts: dict[str, Any] = {}
    if isinstance(design_raw, dict):
        design_opts = dict(design_raw)
        design = design_opts.pop("type", None)
    else:
        design = design_raw
    if design not in DESIGNS:
        raise err("design" + (".type" if isinstance(design_raw, dict) else ""),
                  f"must be one of {', '.join(DESIGNS)}, got {design!r}")
    allowed_opts = {"fractional_factorial": ("fraction", "runs"),
                    "search": ("sampler",)}.get(design, ())
    for k in design_opts:
        if k not in allowed_opts:
            raise err(f"design.{k}", f"unknown option for {design}; allowed: "
                                     f"{', '.join(('type',) + allowed_opts)}")
    sampler = design_opts.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise err("design.sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")

    # baseline and base overrides
    baseline = raw.get("baseline", "fixed")
    if baseline not in ("fixed", "broken"):
        raise err("baseline", f"must be fixed or broken, got {baseline!r}")
    base = raw.get("base", {}) or {}
    if not isinstance(base, dict):
        raise err("base", f"must be a mapping of {cls_name} fields, got {base!r}")
    base_cfg_overrides = {**rec.overrides(baseline=baseline)}
    coerced_base = {}
    for k, v in base.items():
        if k in fixes:
            raise err(f"base.{k}", f"is a fix, not a {cls_name} field: make it a factor "
                                   f"[off, on] or set its fields (see `runner.py fixes`)")
        try:
            coerced_base[k] = coerce(k, v)
        except ConfigError as e:
            raise err(f"base.{k}", str(e).split(": ", 1)[-1]) from None
    try:
        cfg_cls.from_overrides({**base_cfg_overrides, **coerced_base})
    except ConfigError as e:
        raise SpecError(f"{where}: base.{e}") from None

    # factors
    factors_raw = raw["factors"]
    if not isinstance(factors_raw, dict) or not factors_raw:
        raise err("factors", "must be a non-empty mapping: a fix name -> [off, on], or a "
                             "config field -> list of values (or {low, high, log} for search)")
    factors = []
    fields_set: dict[str, str] = {}
    for fname, spec in factors_raw.items():
        key = f"factors.{fname}"
        factor = _parse_factor(str(fname), spec, key, err, design, rec, coerce)
        for f_field in (fixes[fname].after if factor.kind == "fix" else {fname: None}):
            if f_field in fields_set:
                raise err(key, f"sets {f_field}, which factor {fields_set[f_field]} already sets")
            if f_field in coerced_base:
                raise err(key, f"sets {f_field}, which base also sets; remove one of them")
            fields_set[f_field] = str(fname)
        for value in factor.values:  # each level must make a valid config on its own
            try:
                cfg_cls.from_overrides({**base_cfg_overrides, **coerced_base,
                                            **factor.overrides(value)})
            except ConfigError as e:
                raise err(key, f"value {format_value(value)}: {str(e)}") from None
        factors.append(factor)
    if design in ("one_at_a_time", "fractional_factorial"):
        bad = [f.name for f in factors if len(f.values) != 2]
        if bad:
            raise err(f"factors.{bad[0]}", f"{design} needs two-level factors (a fix [off, on] or "
                                           f"a field with exactly two values [before, after])")
    # stress factors: fields crossed with every cell of the design
    stress_raw = raw.get("stress", {}) or {}
    if not isinstance(stress_raw, dict):
        raise err("stress", f"must be a mapping of config field -> list of values, e.g. "
                            f"{{lr: [1e-3, 1e-2, 1e-1], precision: [fp32, fp16]}}, got {stress_raw!r}")
    if stress_raw and design == "search":
        raise err("stress", "is crossed with a designed set of cells; a search design samples its "
                            "cells, so put the field in factors (as a range or list) instead")
    stress = []
    for fname, spec_ in stress_raw.items():
        key = f"stress.{fname}"
        if fname in fixes:
            raise err(key, "is a fix; stress factors are config fields (lr, precision, "
                           "features, feature_scale, ...); put fixes under factors")
        if isinstance(spec_, dict):
            raise err(key, f"takes a list of values (a ladder), got {spec_!r}")
        factor = _parse_factor(str(fname), spec_, key, err, "full_factorial", rec, coerce)
        factor = Factor(factor.name, "field", factor.values, None, stress=True)
        if str(fname) in fields_set:
            raise err(key, f"sets {fname}, which factor {fields_set[str(fname)]} already sets")
        if str(fname) in coerced_base:
            raise err(key, f"sets {fname}, which base also sets; remove one of them")
        fields_set[str(fname)] = str(fname)
        for value in factor.values:
            try:
                cfg_cls.from_overrides({**base_cfg_overrides, **coerced_base,
                                            **factor.overrides(value)})
            except ConfigError as e:
                raise err(key, f"value {format_value(value)}: {str(e)}") from None
        stress.append(factor)

    fraction = _fraction_p(design_opts, len(factors), err) if design == "fractional_factorial" else 0

    # seeds
    seeds_raw = raw["seeds"]
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = tuple(range(seeds_raw))
    elif (isinstance(seeds_raw, list) and seeds_raw and
          all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw)):
        if len(set(seeds_raw)) != len(seeds_raw):
            raise err("seeds", f"has duplicates: {seeds_raw!r}")
        seeds = tuple(seeds_raw)
    else:
        raise err("seeds", f"must be a count >= 1 or a list of distinct integers >= 0, got {seeds_raw!r}")

    # objective
    obj = raw.get("objective", {}) or {}
    if isinstance(obj, str):
        obj = {"metric": obj}
    if not isinstance(obj, dict):
        raise err("objective", f"must be a mapping {{metric, direction}}, got {obj!r}")
    for k in obj:
        if k not in ("metric", "direction"):
            raise err(f"objective.{k}", "unknown key; allowed: metric, direction")
    metric = obj.get("metric", "final_val_f1")
    if metric not in OBJECTIVES:
        raise err("objective.metric", f"must be one of {', '.join(OBJECTIVES)}, got {metric!r}")
    direction = obj.get("direction", OBJECTIVES[metric][0])
    if direction not in ("maximize", "minimize"):
        raise err("objective.direction", f"must be maximize or minimize, got {direction!r}")

    # budget and retries
    budget = raw.get("budget", {}) or {}
    if not isinstance(budget, dict):
        raise err("budget", f"must be a mapping {{trials, minutes}}, got {budget!r}")
    for k in budget:
        if k not in ("trials", "minutes"):
            raise err(f"budget.{k}", "unknown key; allowed: trials, minutes")
    trials = budget.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise err("budget.trials", f"must be an integer >= 1, got {trials!r}")
    if design == "search" and trials is None:
        raise err("budget.trials", "required for a search design (how many cells to sample)")
    minutes = budget.get("minutes")
    if minutes is not None:
        try:
            minutes = float(minutes)
            assert minutes > 0
        except (TypeError, ValueError, AssertionError):
            raise err("budget.minutes", f"must be a number > 0, got {budget['minutes']!r}") from None
    retries = raw.get("retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise err("retries", f"must be an integer >= 0, got {retries!r}")

    return StudySpec(name=name, description=description.strip(), design=design,
                     factors=tuple(factors) + tuple(stress), seeds=seeds, baseline=baseline, base=coerced_base,
                     objective_metric=metric, direction=direction, fraction=fraction,
                     sampler=sampler, trials=trials,
                     minutes=minutes, retries=retries, source=where, recipe=rec)


def _fraction_p(opts: dict[str, Any], k: int, err) -> int:
    """p of the 2^(k-p) design from `fraction: 1/4` (the share of the full design's runs; also
    0.25), `runs: 16`, or the older `fraction: 2` (the integer p itself: 2 means a quarter)."""
    def possible() -> str:
        ok = []
        for p in range(1, k):
            try:
                fractional_generators(k, p)
                ok.append(f"1/{2 ** p} ({2 ** (k - p)} runs)")
            except ValueError:
                pass
        return (f"possible for {k} two-level factors at resolution IV or higher: "
                + (", ".join(ok) if ok else "none (a fractional design needs at least 4 factors)"))

    if "fraction" in opts and "runs" in opts:
        raise err("design", "give fraction or runs, not both")
    key = "design.runs" if "runs" in opts else "design.fraction"
    raw = opts.get("runs", opts.get("fraction", 1))
    p: Optional[int] = None
    if "runs" in opts:
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1 and raw & (raw - 1) == 0:
            p = k - (raw.bit_length() - 1)
    elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        p = raw  # the integer form: p itself
    else:
        share = raw
        if isinstance(raw, str) and re.fullmatch(r"\s*1\s*/\s*[0-9]+\s*", raw):
            share = 1 / int(raw.split("/")[1]) if int(raw.split("/")[1]) else None
        if isinstance(share, float) and 0 < share < 1:
            q = round(-math.log2(share))
            p = q if q >= 1 and 2.0 ** -q == share else None
    if p is None or not 1 <= p < k:
        form = ("a power of two, 2^(k-p) runs" if "runs" in opts else
                "1/2, 1/4, 1/8, ... (the share of the full design's runs), or the integer p of "
                "2^(k-p)")
        raise err(key, f"{raw!r} is not a possible fraction: use {form}; {possible()}")
    try:
        fractional_generators(k, p)
    except ValueError:
        raise err(key, f"{raw!r} (a 2^({k}-{p}) design of {2 ** (k - p)} runs) is not possible: "
                       f"{possible()}") from None
    return p


def _parse_factor(name: str, spec: Any, key: str, err, design: str, rec: Recipe,
                  _coerce) -> Factor:
    fixes, cfg_cls = rec.fix_map, rec.config
    if name in fixes:
        if not isinstance(spec, list) or len(spec) < 2:
            raise err(key, f"a fix takes [off, on] (or [on, off]), got {spec!r}")
        values = []
        for v in spec:
            if isinstance(v, str) and v.lower() in ("on", "off"):
                v = v.lower() == "on"
            if not isinstance(v, bool):
                raise err(key, f"a fix takes the values off and on, got {v!r}")
            values.append(v)
        if len(set(values)) != len(values):
            raise err(key, f"has duplicate values: {spec!r}")
        return Factor(name, "fix", tuple(values), fix=fixes[name])
    if name not in cfg_cls.field_names():
        raise err(key, f"not a fix or config field of {rec.name}; fixes: {', '.join(fixes)}; "
                       f"fields: {', '.join(cfg_cls.field_names())}")
    if name in PLACE_FIELDS:
        raise err(key, f"{name} is where a run happens, not what it is (two values would be the "
                       f"same run twice): set it in base, or per worker with --device")
    if isinstance(spec, dict):
        if design != "search":
            raise err(key, f"a range {{low, high, log}} needs design: search; {design} takes a list "
                           f"of values")
        for k in spec:
            if k not in ("low", "high", "log"):
                raise err(f"{key}.{k}", "unknown key; allowed: low, high, log")
        if "low" not in spec or "high" not in spec:
            raise err(key, "a range needs low and high")
        try:
            low, high = _coerce(name, spec["low"]), _coerce(name, spec["high"])
        except ConfigError as e:
            raise err(key, str(e).split(": ", 1)[-1]) from None
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise err(key, f"a range needs a numeric field; {name} is not numeric")
        if not low < high:
            raise err(key, f"low must be < high, got low={low!r} high={high!r}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise err(f"{key}.log", f"must be true or false, got {log!r}")
        if log and low <= 0:
            raise err(key, f"a log range needs low > 0, got {low!r}")
        for end in (low, high):  # both ends must be valid values, as list values must
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", HighLearningRateWarning)
                    cfg_cls.from_overrides({name: end})
            except ConfigError as e:
                raise err(key, f"range end {format_value(end)}: {str(e)}") from None
        return Factor(name, "field", (), Range(float(low), float(high), log, isinstance(low, int)))
    if not isinstance(spec, list) or len(spec) < 2:
        raise err(key, f"takes a list of at least two values, got {spec!r}")
    try:
        values = tuple(_coerce(name, v) for v in spec)
    except ConfigError as e:
        raise err(key, str(e).split(": ", 1)[-1]) from None
    if len(set(values)) != len(values):
        raise err(key, f"has duplicate values: {spec!r}")
    return Factor(name, "field", values)
