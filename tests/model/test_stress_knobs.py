"""Stress knobs: precision, power features, feature scale, warmup/schedule, adam_eps, big nets and
tiny batches, each on real (tiny) training; and run keys that survive added fields."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ablations.design.designs import config_key
from ablations.design.fixes import fix_overrides
from model.config import ConfigError, TrainConfig
from model.data import make_data
import model.train as train_mod
from model.train import build_optimizer, lr_factor, train

TINY = dict(n_songs=8, frames=64, batch_size=4, epochs=1, steps_per_epoch=6, device="cpu")
# The precision tests also run on CUDA where it is present (benchmarks/cuda_checks.py runs them).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cfg(**kw) -> TrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig.from_overrides({**TINY, **kw})


# ------------------------------------------------------------------------ precision
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def conv_dtypes(monkeypatch) -> set:
    """The dtypes the model's convolutions compute in during train(): a run that silently fell
    back to fp32 would pass every finite-ness check, so the precision tests look at these."""
    seen: set = set()
    real = train_mod.build_model

    def build(c, n_features):
        model = real(c, n_features)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv1d):
                m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
        return model

    monkeypatch.setattr(train_mod, "build_model", build)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_finite_at_the_defaults(precision, device, conv_dtypes):
    res = train(cfg(precision=precision, device=device))
    assert conv_dtypes == {DTYPES[precision]}  # autocast really ran in that precision
    assert res.status in ("converged", "collapsed")  # 6 steps: learning is not the point
    assert res.nonfinite_events == 0 and math.isfinite(res.final_val_loss)
    assert math.isfinite(res.init_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_scaler_skips_are_counted_apart_from_events(device):
    """GradScaler starts at 2^16: the first scaled gradients overflow fp16 and the scaler skips
    those steps. That is its normal working: counted as scaler_skips, never as an event."""
    logged: dict[str, list[float]] = {}
    res = train(cfg(precision="fp16", steps_per_epoch=10, device=device),
                log=lambda m, s: [logged.setdefault(k, []).append(v) for k, v in m.items()])
    assert res.scaler_skips >= 1
    assert res.nonfinite_events == 0 and res.status != "diverged" and not res.events
    assert logged["nonfinite/scaler_skips"][-1] == res.scaler_skips
    assert "nonfinite/events" not in logged


@pytest.mark.parametrize("device", DEVICES)
def test_real_fp16_overflow_is_caught_localised_and_counted(device):
    """Power features (no log) without input normalisation: the first convolution's output
    exceeds fp16's 65504 in the first steps. Nothing is injected: real data, real model, real
    autocast."""
    c = cfg(precision="fp16", features="power", input_norm=False, nonfinite="stop", device=device)
    res = train(c)
    assert res.status == "diverged"
    # within the first steps (which window overflows first depends on the songs drawn)
    assert res.first_nonfinite_step <= 3 and res.nonfinite_events == 1 and res.scaler_skips == 0
    assert res.first_nonfinite_where == "stem.conv:forward"
    ev = res.events[0]
    assert ev.kind == "loss" and ev.forensics.stage == "forward"
    # the module's input was finite (its largest value is what overflowed in the product)
    assert ev.forensics.input.nan == 0 and ev.forensics.input.inf == 0
    # the same run in fp32 is finite: the overflow is fp16's
    assert train(cfg(features="power", input_norm=False, nonfinite="stop")).nonfinite_events == 0


def test_bf16_has_fp32_range(conv_dtypes):
    """The input that overflows fp16 stays finite in bf16 (8 exponent bits, like fp32)."""
    res = train(cfg(precision="bf16", features="power", input_norm=False, nonfinite="stop"))
    assert conv_dtypes == {torch.bfloat16}  # computed in bf16, not quietly in fp32
    assert res.nonfinite_events == 0


# ------------------------------------------------------------------------ features
def test_power_features_undo_the_log():
    db = make_data(cfg())
    power = make_data(cfg(features="power"))
    x, p = db.train[0].features, power.train[0].features
    np.testing.assert_allclose(p, np.power(10.0, x.astype(np.float64)).astype(np.float32),
                               rtol=1e-6)  # synthetic units are bels: power = 10^x
    assert power.val[0].labels is db.val[0].labels  # same songs, same labels
    scaled = make_data(cfg(features="power", feature_scale=1e3))
    np.testing.assert_allclose(scaled.train[0].features, p * 1e3, rtol=1e-6)
    assert make_data(cfg(features="power")) is power  # cached


def test_feature_scale_must_be_positive():
    with pytest.raises(ConfigError, match="feature_scale: must be a finite number > 0"):
        cfg(feature_scale=0)
    with pytest.raises(ConfigError, match="features: must be one of db, power"):
        cfg(features="log")


# ------------------------------------------------------------------------ schedule, eps
def test_warmup_and_schedules():
    c = cfg(warmup_steps=4, lr_schedule="cosine", epochs=2, steps_per_epoch=6)
    total = 12
    f = [lr_factor(c, s, total) for s in range(1, total + 1)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert 0 < f[-1] < 0.1
    lin = cfg(lr_schedule="linear", epochs=2, steps_per_epoch=6)
    assert [round(lr_factor(lin, s, 12), 4) for s in (1, 7, 12)] == [1.0, 0.5, round(1 / 12, 4)]
    assert lr_factor(cfg(), 5, 12) == 1.0
    lrs: list[float] = []
    train(c, log=lambda m, s: lrs.append(m["train/lr"]) if "train/lr" in m else None)
    assert lrs[0] == pytest.approx(c.lr / 4) and lrs[3] == pytest.approx(c.lr)
    assert lrs[-1] < c.lr / 10
    with pytest.raises(ConfigError, match="warmup_steps: must be an integer >= 0"):
        cfg(warmup_steps=-1)


def test_adam_eps_reaches_the_optimizer():
    for opt in ("adam", "adamw"):
        o = build_optimizer(cfg(optimizer=opt, adam_eps=1e-3), [torch.nn.Parameter(torch.ones(2))])
        assert o.param_groups[0]["eps"] == 1e-3


# ------------------------------------------------------------------------ bigger, smaller
@pytest.mark.parametrize("kw", [dict(n_blocks=8, hidden_dim=96), dict(batch_size=1),
                                dict(batch_size=1, norm="batch", precision="fp16")])
def test_deep_wide_nets_and_tiny_batches_train(kw):
    res = train(cfg(**kw))
    assert res.steps == TINY["steps_per_epoch"] and res.status != "diverged"


# ------------------------------------------------------------------------ run keys
def test_run_keys_of_existing_configs_are_unchanged():
    """Keys issued before the stress fields existed (computed with that code): an upgrade that
    adds fields must not re-run a resumed study's finished runs."""
    assert config_key(TrainConfig()) == "4fa19a8f1582"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = TrainConfig.from_overrides({**fix_overrides(baseline="broken"), "epochs": 5, "seed": 2})
    assert config_key(broken) == "9e238ec4afbf"
    assert config_key(cfg(precision="fp16")) != config_key(cfg())  # a set field is identity
    assert config_key(cfg(warmup_steps=3)) != config_key(cfg())


# ------------------------------------------------------------------------ no chorus to find
def test_validation_without_chorus_warns_and_is_not_a_collapse():
    """Two songs, the validation one without a chorus (issue #16, rough edge 6): F1 is undefined
    there (NaN, with a warning), and predicting no chorus on it is right, not a collapse."""
    from dataclasses import replace

    from model.data import SongData
    from model.train import NoChorusWarning

    data = make_data(cfg())
    song = data.val[0]
    no_chorus = replace(song, labels=np.zeros_like(song.labels))
    only = SongData(data.train, (no_chorus,), data.n_features, data.frame_rate)
    with pytest.warns(NoChorusWarning, match="has no chorus frame: chorus F1 is undefined"):
        res = train(cfg(), data=only)
    assert math.isnan(res.final_val_f1)
    assert res.status != "collapsed"
