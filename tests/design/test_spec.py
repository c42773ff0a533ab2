"""ablations/design/spec.py: study files are validated, and every error names the file and the key."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ablations.design import designs
from ablations.design.spec import (OBJECTIVES, TOP_KEYS, Factor, SpecError, StudySpec, load_spec,
                                   parse_spec)
from model.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "runner.py"
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))

GOOD = """\
name: good
design: full_factorial
factors:
  layer_norm: [off, on]
  lr: [1e-4, 1e-3]
seeds: 2
base: {epochs: 2}
"""


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------ shipped studies
def test_studies_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"quick", "seed_fixes", "seed_fixes_fractional",
                                         "one_at_a_time", "lr_clip_search"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_study_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, StudySpec)
    assert spec.source == str(path)
    assert spec.factors and spec.seeds
    if spec.design == "search":
        assert spec.trials and all(f.range is not None or f.values for f in spec.factors)
        return
    runs = designs.runs(spec)
    assert runs
    for run in runs:  # nothing trains with a string where a number is meant
        for name in ("lr", "grad_clip", "residual_scale", "param_clamp", "z_loss"):
            v = getattr(run.config, name, None)  # (fields of one recipe or the other)
            assert v is None or isinstance(v, float), (name, v)


def test_shipped_study_sizes():
    by_name = {p.stem: load_spec(p) for p in SHIPPED}
    assert len(designs.runs(by_name["quick"])) == 2 * 3 * 3  # input_norm x 3 lr rungs x 3 seeds
    assert len(designs.runs(by_name["seed_fixes"])) == 64 * 3
    assert len(designs.runs(by_name["seed_fixes_fractional"])) == 16 * 3
    assert len(designs.runs(by_name["one_at_a_time"])) == (2 * 8 + 2) * 3
    assert by_name["lr_clip_search"].trials == 30


def test_quick_is_a_stress_ladder_in_the_symptom_regime():
    """The README's main job: one fix from the fixed recipe along an lr ladder, in the regime
    where seed_symptom.yaml reproduces the seed's loss=nan (mel power features under fp16)."""
    quick = load_spec(ROOT / "studies" / "quick.yaml")
    assert [f.name for f in quick.design_factors] == ["input_norm"]
    assert [(f.name, list(f.values)) for f in quick.stress_factors] == [("lr", [1e-3, 1e-2, 1e-1])]
    assert quick.baseline == "fixed" and len(quick.seeds) == 3
    configs = [r.config for r in designs.runs(quick)]
    assert {(c.features, c.precision, c.epochs * c.steps_per_epoch) for c in configs} == {
        ("power", "fp16", 20)}
    assert {c.input_norm for c in configs} == {False, True}


# ---------------------------------------------------------------------------- bad inputs
# (id, file text, key path the message must name)
BAD = [
    ("unknown_top_key", GOOD + "colour: blue\n", "colour"),
    ("unknown_recipe", GOOD + "recipe: chorus_rnn\n", "recipe"),
    ("recipe_not_text", GOOD + "recipe: 3\n", "recipe"),
    ("recipe_no_module", GOOD + "recipe: no_such_pkg.mod:RECIPE\n", "recipe"),
    ("recipe_no_attribute", GOOD + "recipe: model.chorus_cnn:NOPE\n", "recipe"),
    ("recipe_not_a_recipe", GOOD + "recipe: model.chorus_cnn:FIXES\n", "recipe"),
    ("recipe_no_file", GOOD + "recipe: missing_recipe.py:RECIPE\n", "recipe"),
    ("missing_name", GOOD.replace("name: good\n", ""), "name"),
    ("bad_name", GOOD.replace("name: good", "name: 'has space'"), "name"),
    ("bad_design", GOOD.replace("design: full_factorial", "design: grid"), "design"),
    ("bad_design_type", GOOD.replace("design: full_factorial", "design: {type: grid}"),
     "design.type"),
    ("unknown_design_option",
     GOOD.replace("design: full_factorial", "design: {type: full_factorial, fraction: 1}"),
     "design.fraction"),
    ("bad_sampler", """\
        name: s
        design: {type: search, sampler: grid}
        factors: {lr: {low: 1e-4, high: 1e-2}}
        seeds: 1
        budget: {trials: 3}
        """, "design.sampler"),
    ("unknown_factor", GOOD.replace("seeds: 2", "  bogus_knob: [1, 2]\nseeds: 2"),
     "factors.bogus_knob"),
    ("fix_given_numbers", GOOD.replace("layer_norm: [off, on]", "layer_norm: [1, 2]"),
     "factors.layer_norm"),
    ("fix_given_one_value", GOOD.replace("layer_norm: [off, on]", "layer_norm: [on]"),
     "factors.layer_norm"),
    ("fix_duplicate", GOOD.replace("layer_norm: [off, on]", "layer_norm: [on, on]"),
     "factors.layer_norm"),
    ("field_one_value", GOOD.replace("lr: [1e-4, 1e-3]", "lr: [1e-3]"), "factors.lr"),
    ("field_scalar", GOOD.replace("lr: [1e-4, 1e-3]", "lr: 1e-3"), "factors.lr"),
    ("field_duplicate", GOOD.replace("lr: [1e-4, 1e-3]", "lr: [1e-3, 0.001]"), "factors.lr"),
    ("wrong_type_literal", GOOD.replace("layer_norm: [off, on]", "norm: [layer, group]"),
     "factors.norm"),
    ("string_not_a_number", GOOD.replace("lr: [1e-4, 1e-3]", "lr: [abc, 1e-3]"), "factors.lr"),
    ("int_field_fraction", GOOD.replace("lr: [1e-4, 1e-3]", "epochs: [1.5, 2]").replace(
        "base: {epochs: 2}", "base: {}"), "factors.epochs"),
    ("invalid_value", GOOD.replace("lr: [1e-4, 1e-3]", "grad_clip: [-1, 0.5]"),
     "factors.grad_clip"),
    ("place_as_factor", GOOD.replace("lr: [1e-4, 1e-3]", "device: [cpu, cuda]"), "factors.device"),
    ("invalid_lr_value", GOOD.replace("lr: [1e-4, 1e-3]", "lr: [0, 1e-3]"), "factors.lr"),
    ("range_without_search", GOOD.replace("lr: [1e-4, 1e-3]", "lr: {low: 1e-4, high: 1e-2}"),
     "factors.lr"),
    ("range_low_not_below_high", """\
        name: s
        design: search
        factors: {lr: {low: 1e-2, high: 1e-4}}
        seeds: 1
        budget: {trials: 3}
        """, "factors.lr"),
    ("range_unknown_key", """\
        name: s
        design: search
        factors: {lr: {low: 1e-4, high: 1e-2, step: 2}}
        seeds: 1
        budget: {trials: 3}
        """, "factors.lr.step"),
    ("range_log_nonpositive", """\
        name: s
        design: search
        factors: {weight_decay: {low: 0, high: 1e-2, log: true}}
        seeds: 1
        budget: {trials: 3}
        """, "factors.weight_decay"),
    ("search_without_trials", """\
        name: s
        design: search
        factors: {lr: {low: 1e-4, high: 1e-2, log: true}}
        seeds: 1
        """, "budget.trials"),
    ("budget_trials_zero", GOOD + "budget: {trials: 0}\n", "budget.trials"),
    ("budget_minutes_text", GOOD + "budget: {minutes: soon}\n", "budget.minutes"),
    ("budget_unknown_key", GOOD + "budget: {hours: 2}\n", "budget.hours"),
    ("stress_not_a_mapping", GOOD + "stress: [lr]\n", "stress"),
    ("seeds_zero", GOOD.replace("seeds: 2", "seeds: 0"), "seeds"),
    ("seeds_duplicates", GOOD.replace("seeds: 2", "seeds: [1, 1]"), "seeds"),
    ("seeds_text", GOOD.replace("seeds: 2", "seeds: x"), "seeds"),
    ("seeds_negative", GOOD.replace("seeds: 2", "seeds: [0, -1]"), "seeds"),
    ("seeds_bool", GOOD.replace("seeds: 2", "seeds: true"), "seeds"),
    ("objective_metric", GOOD + "objective: {metric: f2}\n", "objective.metric"),
    ("objective_metric_short_form", GOOD + "objective: f2\n", "objective.metric"),
    ("objective_direction", GOOD + "objective: {metric: final_val_f1, direction: up}\n",
     "objective.direction"),
    ("objective_unknown_key", GOOD + "objective: {metric: final_val_f1, goal: 1}\n",
     "objective.goal"),
    ("fractional_three_factors", """\
        name: f
        design: {type: fractional_factorial, fraction: 1}
        factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on]}
        seeds: 1
        """, "design.fraction"),
    ("fractional_fraction_too_high", """\
        name: f
        design: {type: fractional_factorial, fraction: 2}
        factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on],
                  layer_norm: [off, on], clip_0_5: [off, on]}
        seeds: 1
        """, "design.fraction"),
    ("fractional_fraction_not_int", """\
        name: f
        design: {type: fractional_factorial, fraction: half}
        factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on],
                  layer_norm: [off, on]}
        seeds: 1
        """, "design.fraction"),
    ("fractional_three_levels", """\
        name: f
        design: {type: fractional_factorial, fraction: 1}
        factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on],
                  lr: [1e-4, 2e-4, 3e-4]}
        seeds: 1
        """, "factors.lr"),
    ("one_at_a_time_three_levels",
     GOOD.replace("design: full_factorial", "design: one_at_a_time")
         .replace("lr: [1e-4, 1e-3]", "lr: [1e-4, 2e-4, 3e-4]"), "factors.lr"),
    ("base_unknown_field", GOOD.replace("base: {epochs: 2}", "base: {epochs: 2, colour: red}"),
     "base.colour"),
    ("base_bad_value", GOOD.replace("base: {epochs: 2}", "base: {epochs: many}"), "base.epochs"),
    ("base_invalid_value", GOOD.replace("base: {epochs: 2}", "base: {epochs: 0}"), "base.epochs"),
    ("base_not_mapping", GOOD.replace("base: {epochs: 2}", "base: [epochs]"), "base"),
    ("base_and_field_factor", GOOD.replace("base: {epochs: 2}", "base: {lr: 1e-4}"),
     "factors.lr"),
    ("base_and_fix_factor", GOOD.replace("base: {epochs: 2}", "base: {norm: batch}"),
     "factors.layer_norm"),
    ("two_factors_one_field", GOOD.replace("layer_norm: [off, on]", "low_lr: [off, on]"),
     "factors.lr"),
    ("fix_in_base", GOOD.replace("base: {epochs: 2}", "base: {layer_norm: on}"),
     "base.layer_norm"),
    ("baseline_bad", GOOD + "baseline: half\n", "baseline"),
    ("retries_negative", GOOD + "retries: -1\n", "retries"),
    ("factors_empty", GOOD.split("factors:")[0] + "factors: {}\nseeds: 1\n", "factors"),
]


@pytest.mark.parametrize("text,key", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text, "bad_study.yaml")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert f": {key}: " in msg or f": {key} " in msg, msg
    assert "\n" not in msg, msg


def test_range_endpoints_are_validated_like_values(tmp_path):
    """A range whose end is not a valid value (lr <= 0, grad_clip < 0) must be refused when the
    file is read, as a list value would be, not when a sampled trial crashes."""
    for factor, rng in (("lr", "{low: -1, high: 1e-2}"), ("grad_clip", "{low: -5, high: 1.0}")):
        path = write(tmp_path, f"""\
            name: s
            design: search
            factors: {{{factor}: {rng}}}
            seeds: 1
            budget: {{trials: 3}}
            """)
        with pytest.raises(SpecError, match=f"^{path}: factors.{factor}"):
            load_spec(path)


def test_every_key_of_a_study_file_has_a_bad_input():
    # The table is the validator's checklist: a key added to study files (spec.TOP_KEYS) without a
    # bad case here fails this test. `description` is free text: nothing to get wrong.
    covered = {key.split(".")[0] for _, _, key in BAD}
    assert set(TOP_KEYS) - {"description"} <= covered, set(TOP_KEYS) - {"description"} - covered


def test_invalid_value_message_says_what_is_wrong(tmp_path):
    path = write(tmp_path, GOOD.replace("lr: [1e-4, 1e-3]", "grad_clip: [-1, 0.5]"))
    with pytest.raises(SpecError, match=r"grad_clip.*-1.*> 0"):
        load_spec(path)
    path = write(tmp_path, GOOD.replace("lr: [1e-4, 1e-3]", "lr: [abc, 1e-3]"))
    with pytest.raises(SpecError, match="'abc'"):
        load_spec(path)
    path = write(tmp_path, GOOD.replace("layer_norm: [off, on]", "norm: [layer, group]"))
    with pytest.raises(SpecError, match="group"):
        load_spec(path)


def test_missing_file_and_bad_yaml(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=f"^{missing}: no such study file$"):
        load_spec(missing)
    path = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML") as e:
        load_spec(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(SpecError, match=str(path)):
        load_spec(path)


# --------------------------------------------------------------------- values and coercion
def test_yaml_1_1_exponent_strings_become_floats(tmp_path):
    path = write(tmp_path, GOOD)
    spec = load_spec(path)
    lr = next(f for f in spec.factors if f.name == "lr")
    assert lr.kind == "field"
    assert lr.values == (0.0001, 0.001)
    assert all(type(v) is float for v in lr.values)
    configs = [r.config for r in designs.runs(spec)]
    assert sorted({c.lr for c in configs}) == [0.0001, 0.001]
    assert all(type(c.lr) is float for c in configs)


def test_yaml_exponent_strings_in_base_and_ranges(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("base: {epochs: 2}",
                                                  "base: {epochs: 2, weight_decay: 1e-5}")))
    assert spec.base == {"epochs": 2, "weight_decay": 1e-5}
    assert type(spec.base["weight_decay"]) is float
    assert all(r.config.weight_decay == 1e-5 for r in designs.runs(spec))
    search = load_spec(ROOT / "studies" / "lr_clip_search.yaml")
    lr = next(f for f in search.factors if f.name == "lr")
    assert lr.range.low == 1e-5 and type(lr.range.low) is float and lr.range.log
    assert not lr.range.integer


def test_fix_factor_values_and_order(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("[off, on]", "[on, off]")))
    ln = next(f for f in spec.factors if f.name == "layer_norm")
    assert ln == Factor("layer_norm", "fix", (True, False))
    assert ln.overrides(True) == {"norm": "layer"} and ln.overrides(False) == {"norm": "batch"}
    assert ln.label(True) == "on" and ln.label(False) == "off"


def test_defaults_and_fields(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "good" and spec.design == "full_factorial"
    assert spec.seeds == (0, 1)
    assert spec.baseline == "fixed" and spec.retries == 2
    assert spec.objective_metric == "final_val_f1" and spec.direction == "maximize"
    assert spec.trials is None and spec.minutes is None
    assert spec.base_config_overrides()["norm"] == "layer"
    spec = load_spec(write(tmp_path, GOOD + "baseline: broken\nobjective: final_val_loss\n"
                                            "budget: {minutes: 1.5}\n"))
    assert spec.baseline == "broken" and spec.base_config_overrides()["norm"] == "batch"
    assert spec.base_config_overrides()["epochs"] == 2
    assert spec.objective_metric == "final_val_loss" and spec.direction == "minimize"
    assert spec.minutes == 1.5


def test_seeds_list_and_overrides(tmp_path):
    spec = load_spec(write(tmp_path, GOOD), overrides={"seeds": [3, 7], "name": "other"})
    assert spec.seeds == (3, 7) and spec.name == "other"
    with pytest.raises(SpecError, match="seeds"):
        load_spec(write(tmp_path, GOOD), overrides={"seeds": 0})


def test_fractional_spec_accepted(tmp_path):
    spec = load_spec(ROOT / "studies" / "seed_fixes_fractional.yaml")
    assert spec.design == "fractional_factorial" and spec.fraction == 2
    spec = load_spec(write(tmp_path, """\
        name: f
        design: fractional_factorial
        factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on],
                  layer_norm: [off, on]}
        seeds: 1
        """))
    assert spec.fraction == 1  # the default: a half fraction


@pytest.mark.parametrize("metric", list(OBJECTIVES))
def test_diverged_value_is_the_worst(metric):
    natural, worst = OBJECTIVES[metric]
    raw = {"name": "x", "design": "full_factorial", "factors": {"layer_norm": [False, True]},
           "seeds": 1}
    spec = parse_spec({**raw, "objective": {"metric": metric}})
    assert spec.direction == natural
    assert spec.diverged_value() == worst
    other = "minimize" if natural == "maximize" else "maximize"
    flipped = parse_spec({**raw, "objective": {"metric": metric, "direction": other}})
    # the worst value in the flipped direction: +inf when minimising, -inf when maximising
    assert flipped.diverged_value() == (math.inf if other == "minimize" else -math.inf)


def test_final_val_f1_diverged_value_is_zero():
    spec = parse_spec({"name": "x", "design": "full_factorial",
                       "factors": {"layer_norm": [False, True]}, "seeds": 1})
    assert spec.diverged_value() == 0.0


# --------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("case", ["string_not_a_number", "missing_file"])
def test_cli_run_bad_study_exits_2_with_one_line(tmp_path, case):
    if case == "missing_file":
        path = tmp_path / "BAD.yaml"
    else:
        path = write(tmp_path, dict((b[0], b[1]) for b in BAD)[case], "BAD.yaml")
    p = subprocess.run([sys.executable, str(RUNNER), "run", str(path), "--storage",
                        f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri",
                        f"sqlite:///{tmp_path}/mlflow.db"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------- rough edges: duplicate keys, fraction
@pytest.mark.parametrize("text,key,lines", [
    (GOOD + "name: other\n", "name", "on lines 1 and 8"),
    (GOOD.replace("base: {epochs: 2}", "base:\n  lr: 1e-4\n  epochs: 2\n  lr: 1e-3"), "lr",
     "on lines 8 and 10"),
    (GOOD.replace("  lr: [1e-4, 1e-3]\n", "  lr: [1e-4, 1e-3]\n  layer_norm: [on, off]\n"),
     "layer_norm", "on lines 4 and 6"),
    (GOOD.replace("base: {epochs: 2}", "base: {epochs: 2, epochs: 3}"), "epochs",
     "on line 7 twice"),
], ids=["top_level_name", "lr_in_base", "factor", "flow_mapping"])
def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys silently; a study file must not."""
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f"{path}: duplicate key {key!r} {lines} (in the same mapping); "
                            f"keep one")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: {...}` then a key of the merged mapping is YAML's way to override, not a duplicate."""
    spec = load_spec(write(tmp_path, GOOD.replace(
        "base: {epochs: 2}", "base:\n  <<: {epochs: 2, batch_size: 4}\n  epochs: 3")))
    assert spec.base == {"epochs": 3, "batch_size": 4}


SIX = """\
name: f
design: {type: fractional_factorial, %s}
factors: {bias_init: [off, on], no_clamp: [off, on], plain_residual: [off, on],
          layer_norm: [off, on], clip_0_5: [off, on], low_lr: [off, on]}
seeds: 1
"""


@pytest.mark.parametrize("form", ["fraction: 1/4", "fraction: 0.25", "runs: 16",
                                  "fraction: 2"])
def test_fraction_forms_mean_the_same_quarter(tmp_path, form):
    """`fraction: 2` (the old integer p of 2^(k-p)) reads as a half to most people; 1/4 and
    runs: 16 say what they mean. All four are the same 16-run design."""
    spec = load_spec(write(tmp_path, SIX % form))
    assert spec.fraction == 2
    quarter = load_spec(write(tmp_path, SIX % "fraction: 2", "old.yaml"))
    assert designs.cells(spec) == designs.cells(quarter) and len(designs.cells(spec)) == 16


@pytest.mark.parametrize("form,key,says", [
    ("fraction: 1/3", "design.fraction", "'1/3' is not a possible fraction"),
    ("fraction: 1/8", "design.fraction", "'1/8' (a 2^(6-3) design of 8 runs) is not possible"),
    ("fraction: 0.3", "design.fraction", "0.3 is not a possible fraction"),
    ("fraction: half", "design.fraction", "'half' is not a possible fraction"),
    ("fraction: 0", "design.fraction", "0 is not a possible fraction"),
    ("fraction: 6", "design.fraction", "6 is not a possible fraction"),
    ("runs: 12", "design.runs", "12 is not a possible fraction: use a power of two"),
    ("runs: 64", "design.runs", "64 is not a possible fraction"),
    ("runs: 8", "design.runs", "8 (a 2^(6-3) design of 8 runs) is not possible"),
    ("fraction: 1/2, runs: 32", "design", "give fraction or runs, not both"),
])
def test_an_impossible_fraction_says_which_are_possible(tmp_path, form, key, says):
    path = write(tmp_path, SIX % form)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}: ") and says in msg, msg
    if key != "design":
        assert msg.endswith("possible for 6 two-level factors at resolution IV or higher: "
                            "1/2 (32 runs), 1/4 (16 runs)"), msg
