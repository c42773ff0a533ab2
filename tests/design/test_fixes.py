"""ablations/design/fixes.py: the seed's fixes as on/off toggles, the broken and fixed recipes."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ablations.design.fixes import FIXES, Fix, check_consistent, fix_overrides, table
from model.chorus_cnn import RECIPE as CHORUS_CNN
from model.config import HighLearningRateWarning, TrainConfig
from model.recipe import RecipeError

RUNNER = Path(__file__).resolve().parents[2] / "runner.py"

BROKEN = {
    "classifier_bias": (0.02, 0.0),
    "param_clamp": 0.5,
    "residual_scale": 0.1,
    "norm": "batch",
    "grad_clip": 1.0,
    "lr": 1e-3,
    "nonfinite": "stop",
    "input_norm": False,
}
FIXED = {
    "classifier_bias": (0.0, 0.0),
    "param_clamp": None,
    "residual_scale": 1.0,
    "norm": "layer",
    "grad_clip": 0.5,
    "lr": 5e-4,
    "nonfinite": "zero",
    "input_norm": True,
}
NAMES = ["bias_init", "no_clamp", "plain_residual", "layer_norm", "clip_0_5", "low_lr",
         "nan_zeroing", "input_norm"]


def test_fix_names_are_the_seeds_eight():
    assert list(FIXES) == NAMES


def test_check_consistent_passes():
    check_consistent()  # the fixed recipe is TrainConfig's defaults


def test_check_consistent_detects_a_drifted_default():
    drifted = dict(FIXES)
    drifted["low_lr"] = Fix("low_lr", {"lr": 1e-3}, {"lr": 2e-4}, "claim")
    recipe = dataclasses.replace(CHORUS_CNN, fixes=tuple(drifted.values()))
    with pytest.raises(RecipeError, match="low_lr: after lr=0.0002 but the config's default is 0.0005"):
        check_consistent(recipe)


def test_recipe_broken_gives_the_broken_values():
    assert fix_overrides(baseline="broken") == BROKEN


def test_recipe_fixed_gives_the_fixed_values_and_they_are_the_defaults():
    assert fix_overrides() == FIXED
    assert fix_overrides(baseline="fixed") == FIXED
    assert TrainConfig.from_overrides(fix_overrides()) == TrainConfig()


def test_broken_recipe_is_a_valid_config():
    with pytest.warns(HighLearningRateWarning):  # lr 1e-3 is above the seed's 5e-4
        cfg = TrainConfig.from_overrides(fix_overrides(baseline="broken"))
    for k, v in BROKEN.items():
        assert getattr(cfg, k) == v, k
    assert isinstance(cfg.lr, float) and isinstance(cfg.classifier_bias, tuple)


def test_recipe_on_overrides_the_baseline_per_fix():
    r = fix_overrides({"layer_norm": True, "low_lr": True}, baseline="broken")
    assert r == {**BROKEN, "norm": "layer", "lr": 5e-4}
    r = fix_overrides({"nan_zeroing": False}, baseline="fixed")
    assert r == {**FIXED, "nonfinite": "stop"}


def test_each_fix_toggles_only_its_own_fields():
    for name, fix in FIXES.items():
        off = fix_overrides({name: False}, baseline="fixed")
        changed = {k for k in off if off[k] != FIXED[k]}
        assert changed == set(fix.before), name
        on = fix_overrides({name: True}, baseline="broken")
        changed = {k for k in on if on[k] != BROKEN[k]}
        assert changed == set(fix.after), name


def test_fix_values_returns_a_copy():
    fix = FIXES["low_lr"]
    v = fix.values(True)
    v["lr"] = 123.0
    assert fix.values(True) == {"lr": 5e-4}
    assert fix.values(False) == {"lr": 1e-3}


def test_critical_and_kinds():
    assert {n for n, f in FIXES.items() if f.critical} == {
        "bias_init", "no_clamp", "plain_residual", "nan_zeroing"}
    assert {n for n, f in FIXES.items() if f.kind == "safeguard"} == {"nan_zeroing", "input_norm"}


def test_fix_states_reads_fixes_off_a_config():
    from ablations.tracking.notes import fix_states

    assert fix_states(TrainConfig()) == {n: "on" for n in NAMES}
    with pytest.warns(HighLearningRateWarning):
        broken = TrainConfig.from_overrides(fix_overrides(baseline="broken"))
    assert fix_states(broken) == {n: "off" for n in NAMES}
    states = fix_states(TrainConfig(lr=1e-4, norm="batch"))
    assert states["low_lr"] == "other" and states["layer_norm"] == "off"
    assert states["bias_init"] == "on"


def test_table_lists_every_fix_with_before_and_after():
    text = table()
    for name, fix in FIXES.items():
        line = next(l for l in text.splitlines() if l.startswith(name))
        assert fix.kind in line
        assert line.startswith(name + " *") == fix.critical, line
    assert "classifier_bias=[0.02, 0.0]" in text
    assert "param_clamp=None" in text


def test_cli_fixes_prints_every_fix_name():
    p = subprocess.run([sys.executable, str(RUNNER), "fixes"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    for name in NAMES:
        assert name in p.stdout
    assert "before (broken)" in p.stdout and "after (fixed)" in p.stdout
    assert p.stderr == ""
