"""Metrics and train(): logging, determinism, clipping/clamping, non-finite policies."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import model.train as train_mod
from model.config import HighLearningRateWarning, TrainConfig
from model.metrics import FrameCounts, count_frames, is_collapsed, masked_cross_entropy
from model.train import train

TINY = dict(n_songs=6, frames=64, n_features=16, hidden_dim=8, n_blocks=1, epochs=2,
            steps_per_epoch=5, batch_size=4, device="cpu")
TOTAL_STEPS = TINY["epochs"] * TINY["steps_per_epoch"]
TRAIN_KEYS = {"train/loss", "train/grad_norm", "train/lr", "train/chorus_pct"}
VAL_KEYS = {"val/loss", "val/chorus_f1", "val/chorus_pct", "val/accuracy"}
TIMING = {"wall_time_s", "steps_per_s"}  # wall-clock fields: never reproducible


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


class Recorder:
    """A log callback that keeps every (step, metrics) call."""

    def __init__(self):
        self.calls = []

    def __call__(self, metrics, step):
        self.calls.append((step, dict(metrics)))

    def train_steps(self):
        return [(s, m) for s, m in self.calls if "train/loss" in m]

    def val_steps(self):
        return [(s, m) for s, m in self.calls if "val/loss" in m]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture
def captured_model(monkeypatch):
    """Capture the model train() builds (train() does not return it)."""
    box = {}
    real = train_mod.build_model

    def build(cfg, n_features):
        box["model"] = real(cfg, n_features)
        return box["model"]

    monkeypatch.setattr(train_mod, "build_model", build)
    return box


def _nan_loss_at(monkeypatch, bad_step: int) -> None:
    """Make the training loss NaN at exactly one step (1-based)."""
    calls = {"n": 0}

    def loss_fn(logits, y, mask):
        calls["n"] += 1
        loss = masked_cross_entropy(logits, y, mask)
        return loss * float("nan") if calls["n"] == bad_step else loss

    # through the recipe's loss hook (model/recipe.py), as a recipe with its own loss would
    recipe = dataclasses.replace(train_mod.recipe_for(TrainConfig()), loss=lambda cfg: loss_fn)
    monkeypatch.setattr(train_mod, "recipe_for", lambda cfg: recipe)


# ------------------------------------------------------------------------------ metrics
def test_masked_ce_empty_mask_is_zero():
    """An all-False mask gives a finite 0, not 0/0 = NaN."""
    logits = torch.randn(2, 5, 2)
    loss = masked_cross_entropy(logits, torch.ones(2, 5, dtype=torch.long),
                                torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_masked_ce_equals_plain_ce_over_valid_frames():
    """The masked loss is the plain mean CE over valid frames only."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 2, generator=gen)
    y = torch.randint(0, 2, (2, 6), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    logits[~mask] = 50.0 * torch.tensor([1.0, -1.0])  # padded frames with a huge loss if counted
    assert_close(masked_cross_entropy(logits, y, mask), F.cross_entropy(logits[mask], y[mask]))


def test_frame_counts_hand_example():
    """tp=3, fp=1, fn=2, tn=4: F1 = 6/9, chorus% = 40, accuracy = 0.7."""
    c = FrameCounts(tp=3, fp=1, fn=2, tn=4, loss_sum=5.0)
    assert c.frames == 10
    assert c.f1() == pytest.approx(6 / 9)
    assert c.chorus_pct() == pytest.approx(40.0)
    assert c.accuracy() == pytest.approx(0.7)
    assert c.loss() == pytest.approx(0.5)


def test_frame_counts_empty():
    """No frames: F1 (nothing to find), chorus%/accuracy/loss all NaN."""
    c = FrameCounts()
    assert math.isnan(c.f1())
    assert math.isnan(c.chorus_pct()) and math.isnan(c.accuracy()) and math.isnan(c.loss())


def test_f1_undefined_without_chorus_frames():
    """No true chorus frame: F1 is undefined (NaN), whatever was predicted; one chorus frame
    missed makes it 0 again."""
    assert math.isnan(FrameCounts(tp=0, fp=0, fn=0, tn=10).f1())
    assert math.isnan(FrameCounts(tp=0, fp=3, fn=0, tn=7).f1())
    assert FrameCounts(tp=0, fp=0, fn=1, tn=9).f1() == 0.0


@pytest.mark.parametrize("pred, truth, collapsed", [(0.0, 0.0, False), (0.0, 0.5, False),
                                                    (0.0, 35.0, True), (100.0, 100.0, False),
                                                    (100.0, 35.0, True), (0.5, 35.0, True)])
def test_is_collapsed_only_where_the_truth_has_both_classes(pred, truth, collapsed):
    """Predicting no chorus on songs without chorus is right, not a collapse."""
    assert is_collapsed(pred, truth) is collapsed


def test_count_frames_matches_hand_counts():
    """count_frames counts tp/fp/fn/tn over valid frames only and sums the masked loss."""
    # predictions (chorus if logit1 > logit0): C C V V C V ; labels: 1 0 1 0 1 1 ; last invalid
    chorus, verse = [0.0, 1.0], [1.0, 0.0]
    logits = torch.tensor([[chorus, chorus, verse, verse, chorus, verse]])
    y = torch.tensor([[1, 0, 1, 0, 1, 1]])
    mask = torch.tensor([[True] * 5 + [False]])
    tp, fp, fn, tn, loss_sum = count_frames(logits, y, mask).tolist()
    assert (tp, fp, fn, tn) == (2, 1, 1, 1)
    assert loss_sum == pytest.approx(masked_cross_entropy(logits, y, mask).item() * 5)


@pytest.mark.parametrize("pct, collapsed", [(0.0, True), (0.5, True), (99.5, True), (100.0, True),
                                            (1.0, False), (35.0, False), (99.0, False),
                                            (float("nan"), False)])
def test_is_collapsed_thresholds(pct, collapsed):
    """Below 1% or above 99% chorus is collapse; 35% and NaN are not."""
    assert is_collapsed(pct) is collapsed


# ------------------------------------------------------------------------------ train
def test_tiny_run_converges_and_logs_every_step_and_epoch():
    """Each step logs the train/* keys, each epoch the val/* keys at its last step."""
    rec = Recorder()
    res = train(tiny(), log=rec)
    assert res.status == "converged"
    assert (res.steps, res.epochs) == (TOTAL_STEPS, TINY["epochs"])
    train_calls, val_calls = rec.train_steps(), rec.val_steps()
    assert [s for s, _ in train_calls] == list(range(1, TOTAL_STEPS + 1))
    assert all(set(m) == TRAIN_KEYS for _, m in train_calls)
    assert [s for s, _ in val_calls] == [5, 10]
    assert all(set(m) == VAL_KEYS for _, m in val_calls)
    assert all(m["train/lr"] == 5e-4 for _, m in train_calls)
    last_val = val_calls[-1][1]
    assert res.final_val_f1 == last_val["val/chorus_f1"]
    assert res.final_val_loss == last_val["val/loss"]
    assert res.final_train_loss == train_calls[-1][1]["train/loss"]
    assert res.best_val_f1 == max(m["val/chorus_f1"] for _, m in val_calls)
    assert res.max_grad_norm == max(m["train/grad_norm"] for _, m in train_calls)
    assert res.first_nonfinite_step is None and res.nonfinite_events == 0 and res.events == []


def test_train_is_deterministic_on_cpu():
    """Same config and seed twice: identical logged metrics and outcome (timings excluded)."""
    runs = []
    for _ in range(2):
        rec = Recorder()
        res = train(tiny(seed=3), log=rec)
        runs.append((rec.calls, res))
    (calls_a, res_a), (calls_b, res_b) = runs
    assert calls_a == calls_b
    assert res_a.status == res_b.status
    out_a, out_b = res_a.outcome(), res_b.outcome()
    assert out_a.keys() == out_b.keys()
    assert all(_same(out_a[k], out_b[k]) for k in out_a if k not in TIMING)


def test_train_seed_changes_run():
    """A different seed gives a different run (so determinism above is not vacuous)."""
    losses = []
    for seed in (0, 1):
        rec = Recorder()
        train(tiny(seed=seed), log=rec)
        losses.append([m["train/loss"] for _, m in rec.train_steps()])
    assert losses[0] != losses[1]


def test_outcome_is_numeric_and_nan_for_missing():
    """outcome() is all floats, without status/events; None (no non-finite step) becomes NaN."""
    out = train(tiny()).outcome()
    assert "status" not in out and "events" not in out
    assert all(isinstance(v, float) for v in out.values())
    assert math.isnan(out["first_nonfinite_step"])
    assert out["steps"] == TOTAL_STEPS


def test_logged_grad_norm_is_pre_clip():
    """With a tiny grad_clip the logged norm still exceeds it, and step 1 matches the unclipped run."""
    clipped, free = Recorder(), Recorder()
    train(tiny(grad_clip=1e-6), log=clipped)
    train(tiny(grad_clip=None), log=free)
    norms = [m["train/grad_norm"] for _, m in clipped.train_steps()]
    assert all(n > 1e-3 for n in norms)
    assert norms[0] == free.train_steps()[0][1]["train/grad_norm"]
    # Clipping does act: the runs part ways after the first update.
    assert clipped.train_steps()[1][1]["train/loss"] != free.train_steps()[1][1]["train/loss"]


def test_param_clamp_bounds_every_parameter(captured_model):
    """After training with param_clamp=0.05 every parameter lies in [-0.05, 0.05], some at the bound."""
    train(tiny(param_clamp=0.05))
    params = list(captured_model["model"].parameters())
    bound = torch.tensor(0.05)  # float32 0.05, as the parameters store it
    assert all((p.abs() <= bound).all() for p in params)
    assert max(p.abs().max().item() for p in params) == pytest.approx(0.05)


def test_without_param_clamp_parameters_exceed_bound(captured_model):
    """Control: without clamping some parameters are larger than 0.05 (LayerNorm weights start at 1)."""
    train(tiny())
    assert max(p.abs().max().item() for p in captured_model["model"].parameters()) > 0.05


def test_real_divergence_stops():
    """SGD at lr=1e4 without clipping really diverges; nonfinite=stop reports it as diverged."""
    with pytest.warns(HighLearningRateWarning):
        cfg = tiny(optimizer="sgd", lr=1e4, grad_clip=None, param_clamp=None, nonfinite="stop")
    rec = Recorder()
    res = train(cfg, log=rec)
    assert res.status == "diverged"
    assert res.first_nonfinite_step is not None and res.first_nonfinite_step <= TOTAL_STEPS
    assert res.nonfinite_events >= 1
    assert res.steps == res.first_nonfinite_step < TOTAL_STEPS
    assert math.isnan(res.final_val_f1) and math.isnan(res.final_val_loss)
    assert res.events[0].action == "stopped" and res.events[0].step == res.first_nonfinite_step
    bad = [m for s, m in rec.train_steps() if s == res.first_nonfinite_step][0]
    assert not (math.isfinite(bad["train/loss"]) and math.isfinite(bad["train/grad_norm"]))


@pytest.mark.parametrize("policy, lr", [("skip", 1e6), ("zero", 1e6), ("zero", 1e4)])
def test_nan_validation_loss_is_reported_diverged(policy, lr):
    """skip/zero on a real divergence: a run that ends with a NaN val loss must be 'diverged'."""
    with pytest.warns(HighLearningRateWarning):
        cfg = tiny(optimizer="sgd", lr=lr, grad_clip=None, nonfinite=policy)
    res = train(cfg)
    assert not (math.isnan(res.final_val_loss) and res.status != "diverged"), \
        (res.status, res.final_val_loss, res.final_val_chorus_pct)


def test_injected_nan_loss_stop(monkeypatch):
    """A NaN loss at step 3 with nonfinite=stop: diverged at step 3, one 'loss' event."""
    _nan_loss_at(monkeypatch, 3)
    res = train(tiny(nonfinite="stop"))
    assert res.status == "diverged"
    assert (res.first_nonfinite_step, res.steps, res.nonfinite_events) == (3, 3, 1)
    assert [(e.step, e.kind, e.action) for e in res.events] == [(3, "loss", "stopped")]
    assert math.isnan(res.final_val_f1)


def test_injected_nan_loss_skip(monkeypatch, captured_model):
    """nonfinite=skip: the NaN step is skipped, the run completes and is 'recovered'."""
    _nan_loss_at(monkeypatch, 3)
    res = train(tiny(nonfinite="skip"))
    assert res.status == "recovered"
    assert (res.skipped_steps, res.zeroed_steps, res.nonfinite_events) == (1, 0, 1)
    assert res.first_nonfinite_step == 3
    assert res.steps == TOTAL_STEPS and res.epochs == TINY["epochs"]
    assert [(e.step, e.kind, e.action) for e in res.events] == [(3, "loss", "skipped")]
    assert math.isfinite(res.final_val_f1)
    assert all(torch.isfinite(p).all() for p in captured_model["model"].parameters())


def test_skipped_step_leaves_parameters_unchanged(monkeypatch, captured_model):
    """A skipped step (NaN loss at the last step) does not touch the parameters."""
    snapshots = {}

    def log(metrics, step):
        if "train/loss" in metrics and step == TOTAL_STEPS:
            snapshots["before"] = [p.detach().clone() for p in captured_model["model"].parameters()]

    _nan_loss_at(monkeypatch, TOTAL_STEPS)
    res = train(tiny(nonfinite="skip"), log=log)
    assert res.skipped_steps == 1
    after = list(captured_model["model"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(snapshots["before"], after, strict=True))


def test_injected_nan_loss_zero(monkeypatch, captured_model):
    """nonfinite=zero: the NaN gradients are zeroed, the run completes and is 'recovered'."""
    _nan_loss_at(monkeypatch, 3)
    res = train(tiny(nonfinite="zero"))
    assert res.status == "recovered"
    assert (res.zeroed_steps, res.skipped_steps, res.nonfinite_events) == (1, 0, 1)
    assert res.steps == TOTAL_STEPS
    assert [(e.step, e.kind, e.action) for e in res.events] == [(3, "loss", "zeroed")]
    assert all(torch.isfinite(p).all() for p in captured_model["model"].parameters())


@pytest.mark.parametrize("policy", ["stop", "skip", "zero"])
@pytest.mark.parametrize("bad_step", [3, 5, TOTAL_STEPS])
def test_nan_parameter_diverges_under_every_policy(policy, bad_step, captured_model):
    """A parameter set to NaN cannot be recovered: every policy ends 'diverged' with a 'params' event."""

    def log(metrics, step):
        if "train/loss" in metrics and step == bad_step:
            with torch.no_grad():
                captured_model["model"].classifier.weight[0, 0] = float("nan")

    res = train(tiny(nonfinite=policy), log=log)
    assert res.status == "diverged"
    assert [e.kind for e in res.events][-1] == "params"
    assert res.events[-1].action == "stopped"
    assert res.skipped_steps == 0 and res.zeroed_steps == 0
    assert res.first_nonfinite_step in (bad_step, bad_step + 1)
    assert math.isnan(res.final_val_f1)
