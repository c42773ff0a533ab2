"""Non-finite forensics (model/nonfinite.py through train()): a non-finite value injected at a
known place is localised there; each policy does what it says; replay leaves the trajectory
alone; lead-up, recovery, spikes, curves, config checks and the MLflow side."""

import contextlib
import copy
import dataclasses
import csv
import io
import math

import pytest
import torch
import torch.nn.functional as F

import model.train as train_mod
from model.cnn import ChorusCNN
from model.config import ConfigError, HighLearningRateWarning, TrainConfig
from model.data import make_data
from model.metrics import masked_cross_entropy
from model.nonfinite import EVENT_COLUMNS, Monitor, NonFiniteEvent, replay
from model.train import train

TINY = dict(n_songs=6, frames=64, n_features=16, hidden_dim=8, n_blocks=1, epochs=2,
            steps_per_epoch=5, batch_size=4, device="cpu")
TOTAL_STEPS = TINY["epochs"] * TINY["steps_per_epoch"]
B, T, H = TINY["batch_size"], TINY["frames"], TINY["hidden_dim"]
TIMING = {"wall_time_s", "steps_per_s"}
NAN = float("nan")


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


class Recorder:
    """A log callback that keeps every (step, metrics) call and can run a hook at a step."""

    def __init__(self, at=None):
        self.calls, self.at = [], at or {}

    def __call__(self, metrics, step):
        self.calls.append((step, dict(metrics)))
        if "train/loss" in metrics and step in self.at:
            self.at[step]()

    def train(self, step):
        return next(m for s, m in self.calls if s == step and "train/loss" in m)

    def curves(self):
        return [(s, m) for s, m in self.calls if any(k.startswith("nonfinite/") for k in m)]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _same_calls(a, b) -> bool:
    """Logged calls equal, NaN equal to NaN."""
    return len(a) == len(b) and all(
        sa == sb and ma.keys() == mb.keys() and all(_same(ma[k], mb[k]) for k in ma)
        for (sa, ma), (sb, mb) in zip(a, b))


def _same_outcome(a, b) -> bool:
    oa, ob = a.outcome(), b.outcome()
    return oa.keys() == ob.keys() and all(_same(oa[k], ob[k]) for k in oa if k not in TIMING)


@pytest.fixture
def built(monkeypatch):
    """`built(fn)`: run fn(model) on the model train() builds; the model lands in box['model']."""
    box, real = {}, train_mod.build_model  # the original: installing twice must not chain

    def install(fn=None):
        def build(cfg, n_features):
            box["model"] = real(cfg, n_features)
            if fn:
                fn(box["model"])
            return box["model"]

        monkeypatch.setattr(train_mod, "build_model", build)
        return box

    return install


@pytest.fixture
def batches(monkeypatch):
    """`batches({n: fn})`: fn(batch) changes (in place) the n-th training batch (1-based);
    returns {n: batch} of every batch drawn."""
    seen, real = {}, train_mod.WindowSampler

    def install(change):
        class Sampler(real):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.n = 0

            def next(self):
                b = super().next()
                self.n += 1
                seen[self.n] = b
                if self.n in change:
                    change[self.n](b)
                return b

        monkeypatch.setattr(train_mod, "WindowSampler", Sampler)
        return seen

    return install


@pytest.fixture
def optimizer(monkeypatch):
    """`optimizer(after)`: after(k) runs right after the k-th optimizer step; box['opt']."""
    box, real = {}, train_mod.build_optimizer

    def install(after=None):
        def build(cfg, params):
            opt = real(cfg, params)
            box["opt"], count, step = opt, [0], opt.step

            def stepped(*a, **k):
                out = step(*a, **k)
                count[0] += 1
                if after:
                    after(count[0])
                return out

            opt.step = stepped
            return opt

        monkeypatch.setattr(train_mod, "build_optimizer", build)
        return box

    return install


def nan_at(b, row=1, t=5, f=2):
    b.x[row, t, f] = NAN  # the window was gathered into a fresh tensor: safe to write


def _window(b, row):
    return f"{b.song_ids[row]}[{b.starts[row]}:{b.starts[row] + int(b.mask[row].sum())}]"


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, NAN)


# ---------------------------------------------------------------------- localisation
def test_input_localised(batches):
    """A NaN in the batch: stage input, the row and its song window named."""
    seen = batches({3: nan_at})
    res = train(tiny(nonfinite="stop"))
    assert (res.status, res.first_nonfinite_step) == ("diverged", 3)
    assert res.first_nonfinite_where == "model:input"
    f = res.events[0].forensics
    assert (f.tensor, f.stats.shape, f.stats.nan, f.stats.inf) == ("x", [B, T, 16], 1, 0)
    assert f.rows == [1] and f.windows == [_window(seen[3], 1)]


def test_forward_output_localised(built, batches):
    """A test-only forward hook writes one NaN into blocks.0.conv2's output: that module is named,
    with the output's statistics, its (finite) input's, and the one batch row holding it."""

    def poison(m):
        def hook(mod, args, out):
            if not mod.training:  # e.g. the initial validation (init_val_loss): not a step
                return out
            out = out.clone()
            out[2, 7, 3] = NAN
            return out

        m.blocks[0].conv2.register_forward_hook(hook)

    built(poison)
    seen = batches({})
    res = train(tiny(nonfinite="stop"))
    assert (res.status, res.first_nonfinite_step, res.events[0].kind) == ("diverged", 1, "loss")
    assert res.first_nonfinite_where == "blocks.0.conv2:forward"
    f = res.events[0].forensics
    assert f.tensor == "output" and f.stats.shape == [B, T, H]
    assert (f.stats.nan, f.stats.inf) == (1, 0) and math.isfinite(f.stats.absmax)
    assert (f.input.nan, f.input.inf) == (0, 0) and f.input.shape == [B, T, H]
    assert f.rows == [2] and f.windows == [_window(seen[1], 2)]


def test_code_between_child_modules_names_the_parent(built):
    """A NaN that appears between two children (here: in what blocks.0 passes to conv2) is
    blamed on the parent whose forward made it, not on the child that received it."""

    def poison(m):
        def pre(mod, args):
            x = args[0].clone()
            x[0, 0, 0] = math.inf
            return (x,)

        m.blocks[0].conv2.register_forward_pre_hook(pre)

    built(poison)
    res = train(tiny(nonfinite="stop"))
    assert res.first_nonfinite_where == "blocks.0:forward"
    f = res.events[0].forensics
    assert f.tensor == "input[0] of blocks.0.conv2" and (f.stats.nan, f.stats.inf) == (0, 1)


def test_backward_localised_with_anomaly_trace(built):
    """A custom autograd function returning NaN in backward inside blocks.0.conv2: the forward
    is finite, the module whose backward made the NaN is named (not the ones it flowed into),
    and anomaly mode's traceback (anomaly_mode=True) names the function."""
    built(lambda m: m.blocks[0].conv2.register_forward_hook(lambda mod, a, out: NaNGrad.apply(out)))
    res = train(tiny(nonfinite="stop", anomaly_mode=True))
    ev = res.events[0]
    assert (res.first_nonfinite_step, ev.kind, ev.where) == (1, "grad_norm", "blocks.0.conv2:backward")
    assert math.isfinite(ev.loss)
    f = ev.forensics
    assert f.tensor == "grad_input[0]" and f.stats.nan == B * T * H
    assert (f.input.nan, f.input.inf) == (0, 0)  # the gradient flowing in was finite
    assert "NaNGradBackward" in f.anomaly_trace and "Traceback of forward call" in f.anomaly_trace


def _use_loss(monkeypatch, loss_fn):
    """Train with `loss_fn` through the recipe's loss hook (model/recipe.py)."""
    recipe = dataclasses.replace(train_mod.recipe_for(tiny()), loss=lambda cfg: loss_fn)
    monkeypatch.setattr(train_mod, "recipe_for", lambda cfg: recipe)


def test_empty_mask_loss_is_finite_and_a_dividing_loss_is_localised(monkeypatch, batches):
    """A batch with no valid frame: the real loss is 0 (no 0/0), so no event. A loss that divides
    by the frame count unguarded is NaN there, and the replay names the loss stage."""
    seen = batches({3: lambda b: b.mask.zero_()})
    rec = Recorder()
    res = train(tiny(nonfinite="stop"), log=rec)
    assert res.status == "converged" and res.events == []
    assert rec.train(3)["train/loss"] == 0.0 and not seen[3].mask.any()

    def unclamped_cross_entropy(logits, y, mask):  # the mean over valid frames, unguarded
        per_frame = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none")
        m = mask.reshape(-1).to(per_frame.dtype)
        return (per_frame * m).sum() / m.sum()

    _use_loss(monkeypatch, unclamped_cross_entropy)
    res = train(tiny(nonfinite="stop"))
    assert (res.first_nonfinite_step, res.events[0].kind) == (3, "loss")
    assert res.first_nonfinite_where == "unclamped_cross_entropy:loss"
    f = res.events[0].forensics
    assert f.stats.nan == 1 and "0 valid frames" in f.note
    assert (f.input.nan, f.input.inf) == (0, 0)  # the logits were finite


@pytest.mark.parametrize("param_clamp", [None, 0.5])
def test_parameter_broken_by_the_optimizer_step(built, optimizer, batches, param_clamp):
    """A NaN written into classifier.weight right after optimizer step 4 is found at step 5 and
    named `classifier:optimizer_step`, with the batch of step 4; the clamp (when on) keeps it."""
    box = built()
    seen = batches({})

    def after(k):
        if k == 4:
            with torch.no_grad():
                box["model"].classifier.weight[1, 3] = NAN

    optimizer(after)
    res = train(tiny(nonfinite="zero", param_clamp=param_clamp))
    ev = res.events[0]
    assert (res.status, ev.step, ev.kind, ev.action) == ("diverged", 5, "params", "stopped")
    assert res.first_nonfinite_where == "classifier:optimizer_step"
    f = ev.forensics
    assert f.tensor == "param:weight" and (f.stats.shape, f.stats.nan) == ([2, H], 1)
    assert "update of step 4" in f.note and "optimizer state finite" in f.note
    assert f.windows == [_window(seen[4], r) for r in range(B)]


def test_real_divergence_is_localised():
    """SGD at lr=1e4 without clipping really diverges; the replay reproduces it and names a real
    module and stage, the tensor holding non-finite values."""
    with pytest.warns(HighLearningRateWarning):
        cfg = tiny(optimizer="sgd", lr=1e4, grad_clip=None, nonfinite="stop")
    res = train(cfg)
    assert res.status == "diverged"
    ev = res.events[-1]
    module, stage = ev.where.split(":")
    names = {n for n, _ in ChorusCNN.from_config(cfg).named_modules() if n}
    assert stage in ("forward", "backward", "grad_norm") and module in names
    assert ev.forensics.stats.nan + ev.forensics.stats.inf > 0 or stage == "grad_norm"
    assert res.first_nonfinite_where == ev.where and len(ev.lead_up) == ev.step - 1


# ---------------------------------------------------------------------------- policies
def test_skip_leaves_parameters_unchanged(built, batches):
    """skip: the parameters after the skipped step 3 are those before it."""
    box = built()
    batches({3: nan_at})
    snaps = {}
    rec = Recorder({s: (lambda s=s: snaps.__setitem__(s, [p.detach().clone() for p in
                                                           box["model"].parameters()]))
                    for s in (3, 4, 5)})
    res = train(tiny(nonfinite="skip"), log=rec)
    assert (res.status, res.skipped_steps, res.events[0].action) == ("recovered", 1, "skipped")
    assert all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[4], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[4], snaps[5], strict=True))


def test_zero_steps_with_zeros_in_place_of_nonfinite_entries(built):
    """zero: classifier.bias's gradient has a NaN in entry 0 every step; the step is taken with
    0 there and the finite entry kept. Plain SGD without decay: bias[0] never moves, bias[1] does."""

    def poison(m):
        def hook(g):
            g = g.clone()
            g[0] = NAN
            return g

        m.classifier.bias.register_hook(hook)

    box = built(poison)
    res = train(tiny(nonfinite="zero", optimizer="sgd", weight_decay=0.0, grad_clip=None))
    assert res.status == "recovered" and res.zeroed_steps == TOTAL_STEPS
    assert {e.where for e in res.events} == {"classifier:backward"}
    assert res.events[0].forensics.tensor == "grad:bias"
    bias = box["model"].classifier.bias.detach()
    assert bias[0].item() == 0.0 and bias[1].item() != 0.0  # both start at 0


def test_rollback_restores_saved_state_and_halves_lr(built, optimizer):
    """rollback, state kept every 4 steps: a NaN parameter after step 6 is found at step 7; the
    model and optimizer state saved before step 4's update come back, lr is halved, the run
    goes on and recovers."""
    box = built()

    def after(k):
        if k == 6:
            with torch.no_grad():
                box["model"].stem.conv.weight[0, 0, 0] = NAN

    opt_box = optimizer(after)
    saved = {}

    def keep(step):
        saved[step] = ([p.detach().clone() for p in box["model"].parameters()],
                       copy.deepcopy(opt_box["opt"].state_dict()["state"]))

    rec = Recorder({4: lambda: keep(4), 8: lambda: keep(8)})
    res = train(tiny(nonfinite="rollback", rollback_every=4), log=rec)
    assert (res.status, res.rollbacks, res.nonfinite_events) == ("recovered", 1, 1)
    ev = res.events[0]
    assert (ev.step, ev.kind, ev.action, ev.where) == (7, "params", "rolled_back",
                                                       "stem.conv:optimizer_step")
    assert ev.recovered is True and res.recovered_events == 1
    params4, state4 = saved[4]
    params8, state8 = saved[8]  # at step 8's log no update has happened since the rollback
    assert all(torch.equal(a, b) for a, b in zip(params4, params8, strict=True))
    assert state4.keys() == state8.keys()
    for k in state4:
        for name in state4[k]:
            torch.testing.assert_close(state4[k][name], state8[k][name], rtol=0, atol=0)
    assert [rec.train(s)["train/lr"] for s in (6, 7, 8, 10)] == [5e-4, 5e-4, 2.5e-4, 2.5e-4]


def test_rollback_on_real_divergence_halves_lr_each_time():
    """A real divergence under rollback: every rollback halves lr; the count is reported."""
    with pytest.warns(HighLearningRateWarning):
        cfg = tiny(optimizer="sgd", lr=1e6, grad_clip=None, nonfinite="rollback", rollback_every=2)
    rec = Recorder()
    res = train(cfg, log=rec)
    assert res.rollbacks >= 1 and res.rollbacks == sum(e.action == "rolled_back" for e in res.events)
    lrs = sorted({m["train/lr"] for s, m in rec.calls if "train/lr" in m}, reverse=True)
    assert lrs == [1e6 * 0.5 ** i for i in range(len(lrs))] and len(lrs) >= 2
    assert len(lrs) - 1 <= res.rollbacks  # the last rollback may have no step after it


# ----------------------------------------------------------------- replay is invisible
def _poison_at_step_3(built, batches):
    """NaN gradient from blocks.0.norm1 during step 3 only (on for the 3rd batch, off at the 4th:
    so it is on during the replay too, which then runs a full forward with dropout)."""
    on = {"v": False}
    built(lambda m: m.blocks[0].norm1.register_forward_hook(
        lambda mod, a, out: NaNGrad.apply(out) if on["v"] else out))
    batches({3: lambda b: on.__setitem__("v", True), 4: lambda b: on.__setitem__("v", False)})


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_replay_does_not_change_the_trajectory(built, batches, norm):
    """skip with an event at step 3: forensics on (with anomaly mode) or off give the same logged
    metrics and outcome. Dropout is on (0.1), so this needs the replay to restore the RNG; with
    BatchNorm it must put the running statistics back too."""
    runs = []
    for kw in (dict(forensics=False), dict(forensics=True), dict(anomaly_mode=True)):
        _poison_at_step_3(built, batches)
        rec = Recorder()
        res = train(tiny(nonfinite="skip", norm=norm, **kw), log=rec)
        runs.append((rec.calls, res))
    (calls_off, off), (calls_on, on), (calls_an, an) = runs
    assert off.skipped_steps == on.skipped_steps == an.skipped_steps == 1
    assert off.first_nonfinite_where == "" and on.first_nonfinite_where == "blocks.0.norm1:backward"
    assert _same_calls(calls_off, calls_on) and _same_calls(calls_off, calls_an)
    assert _same_outcome(off, on) and _same_outcome(off, an)


def test_an_extra_random_draw_would_change_the_trajectory(built, batches):
    """Control for the test above: one extra dropout-RNG draw at step 3 changes the run, so
    equality there is evidence that the replay restores the RNG."""
    _poison_at_step_3(built, batches)
    base = Recorder()
    train(tiny(nonfinite="skip", forensics=False), log=base)
    _poison_at_step_3(built, batches)
    drawn = Recorder({3: lambda: torch.rand(1)})
    train(tiny(nonfinite="skip", forensics=False), log=drawn)
    assert not _same_calls(base.calls, drawn.calls)


def test_replay_restores_rng_buffers_and_grads_and_sees_the_same_dropout():
    """Direct call: replay() reruns with the step's dropout masks and leaves RNG state,
    BatchNorm running statistics and .grad as they were."""
    cfg = tiny(norm="batch", dropout=0.5)
    data = make_data(cfg)
    torch.manual_seed(0)
    model = ChorusCNN.from_config(cfg)
    model.train()
    masks = []
    model.blocks[0].dropout.register_forward_hook(lambda m, a, out: masks.append(out.detach() != 0))
    from model.data import WindowSampler
    b = WindowSampler(data.train, cfg.frames, cfg.batch_size, 0).next()
    rng = torch.get_rng_state()
    loss = masked_cross_entropy(model(b.x, b.mask), b.y, b.mask)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [x.clone() for x in model.buffers()]
    after = torch.get_rng_state()
    found = replay(model, b, masked_cross_entropy, rng, "cpu", anomaly_mode=True)
    assert found.stage == "not_reproduced"  # nothing is non-finite here
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])  # replay, anomaly
    assert torch.equal(torch.get_rng_state(), after)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


# ------------------------------------------------------------------ lead-up, recovery
def test_lead_up_holds_the_previous_k_steps(batches):
    """lead_up=3 and an event at step 7: (step, loss, grad norm, lr) of steps 4..6 as logged."""
    batches({7: nan_at})
    rec = Recorder()
    res = train(tiny(nonfinite="skip", lead_up=3), log=rec)
    ev = res.events[0]
    want = [(s, rec.train(s)["train/loss"], rec.train(s)["train/grad_norm"], rec.train(s)["train/lr"])
            for s in (4, 5, 6)]
    assert ev.step == 7 and ev.lr == 5e-4 and ev.lead_up == want


@pytest.mark.parametrize("lead_up, recovered", [(3, [False, True]), (1, [True, True])])
def test_recovered_means_the_next_k_steps_were_finite(batches, lead_up, recovered):
    """Events at steps 3 and 5: with K=3 the first did not recover (5 is within 3 steps); K=1 it did."""
    batches({3: nan_at, 5: nan_at})
    res = train(tiny(nonfinite="skip", lead_up=lead_up))
    assert [e.step for e in res.events] == [3, 5]
    assert [e.recovered for e in res.events] == recovered
    assert res.recovered_events == sum(recovered)
    assert (res.events_loss, res.events_grad_norm, res.nonfinite_events) == (2, 0, 2)


def test_a_stopped_event_did_not_recover(batches):
    batches({3: nan_at})
    res = train(tiny(nonfinite="stop"))
    assert res.events[0].recovered is False and res.recovered_events == 0


# ------------------------------------------------------------------------------ spikes
def _loss_times_at(monkeypatch, step, factor):
    n = {"k": 0}

    def loss_fn(logits, y, mask):
        n["k"] += 1
        loss = masked_cross_entropy(logits, y, mask)
        return loss * factor if n["k"] == step else loss

    _use_loss(monkeypatch, loss_fn)


@pytest.mark.parametrize("action", ["record", "skip"])
def test_grad_norm_spike_is_a_warning_event(monkeypatch, built, action):
    """A loss x1000 at step 8 (grad norm x1000) with a window of 4: one grad_spike event with its
    lead-up; `record` only records it, `skip` also leaves the parameters alone on that step."""
    box = built()
    _loss_times_at(monkeypatch, 8, 1000.0)
    snaps = {}
    rec = Recorder({s: (lambda s=s: snaps.__setitem__(s, [p.detach().clone() for p in
                                                           box["model"].parameters()]))
                    for s in (8, 9)})
    res = train(tiny(spike_window=4, spike_factor=10.0, spike_action=action, lead_up=2), log=rec)
    assert res.status == "converged" and res.nonfinite_events == 0 and res.spikes == 1
    ev = res.events[0]
    assert (ev.step, ev.kind, ev.action) == (8, "grad_spike", "recorded" if action == "record"
                                             else "skipped")
    assert [s for s, *_ in ev.lead_up] == [6, 7] and ev.recovered is True
    unchanged = all(torch.equal(a, b) for a, b in zip(snaps[8], snaps[9], strict=True))
    assert unchanged == (action == "skip") and res.skipped_steps == (action == "skip")
    assert res.first_nonfinite_step is None and res.first_nonfinite_where == ""


def test_no_spike_check_when_off_or_window_not_full(monkeypatch):
    _loss_times_at(monkeypatch, 8, 1000.0)
    assert train(tiny(spike_factor=None, spike_window=4)).spikes == 0
    _loss_times_at(monkeypatch, 3, 1000.0)
    assert train(tiny(spike_window=4)).spikes == 0  # only 2 norms known at step 3


def test_monitor_spike_threshold():
    mon = Monitor(lead_up=0, spike_factor=3.0, spike_window=3, log=lambda m, s: None)
    # no check until 3 norms are known; then medians 1, 2, 2.9, 2.9 (x3 = 8.7 < 9)
    assert [mon.is_spike(g) for g in (1.0, 1.0, 100.0, 2.0, 2.9, 3.1, 9.0)] == \
        [False, False, False, False, False, False, True]


# ------------------------------------------------------------------ curves and outcome
def test_curves_are_logged_only_where_they_change(monkeypatch, batches):
    """No event: no nonfinite/* metric at all. Events: each count at the step it changes."""
    rec = Recorder()
    train(tiny(), log=rec)
    assert rec.curves() == []
    batches({3: nan_at, 6: nan_at})
    _loss_times_at(monkeypatch, 9, 1000.0)
    rec = Recorder()
    res = train(tiny(nonfinite="skip", spike_window=4), log=rec)
    assert rec.curves() == [
        (3, {"nonfinite/events": 1.0, "nonfinite/skipped_steps": 1.0}),
        (6, {"nonfinite/events": 2.0, "nonfinite/skipped_steps": 2.0}),
        (9, {"nonfinite/spikes": 1.0})]
    out = res.outcome()
    assert all(isinstance(v, float) for v in out.values()) and "first_nonfinite_where" not in out
    assert (out["spikes"], out["skipped_steps"], out["events_loss"], out["rollbacks"]) == (1, 2, 2, 0)


def test_clean_run_has_no_events_and_empty_where():
    res = train(tiny())
    assert res.events == [] and res.first_nonfinite_where == "" and res.spikes == 0
    assert math.isnan(res.outcome()["first_nonfinite_step"])


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, needle", [
    (dict(spike_factor=1.0), "spike_factor: must be a number > 1 or null (off), got 1.0"),
    (dict(spike_factor=math.nan), "spike_factor"),
    (dict(spike_window=0), "spike_window: must be a positive integer, got 0"),
    (dict(rollback_every=0), "rollback_every: must be a positive integer, got 0"),
    (dict(lead_up=-1), "lead_up: must be an integer >= 0, got -1"),
    (dict(anomaly_mode=True, forensics=False), "anomaly_mode: true needs forensics: true"),
    (dict(spike_action="stop"), "spike_action: must be one of record, skip, got 'stop'"),
    (dict(nonfinite="explode"), "nonfinite: must be one of stop, skip, zero, rollback"),
])
def test_config_checks_name_field_and_value(overrides, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**overrides)
    assert needle in str(e.value)


def test_config_from_text():
    cfg = TrainConfig.from_overrides({"nonfinite": "rollback", "spike_factor": "null",
                                      "forensics": "false", "lead_up": "5"})
    assert (cfg.nonfinite, cfg.spike_factor, cfg.forensics, cfg.lead_up) == ("rollback", None, False, 5)


# ------------------------------------------------------------------------------ MLflow
def test_mlflow_events_table_curves_and_tags(tmp_path, monkeypatch, batches):
    """A run with a skipped non-finite step and a spike: the events table has one row per event
    with the forensic columns, the curves are step metrics, and the run is tagged."""
    from mlflow.tracking import MlflowClient

    from ablations.tracking.tracker import StudyTracker

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StudyTracker(uri, "nonfinite")
    tracker.ensure_experiment("test", {})
    cfg = tiny(nonfinite="skip", spike_window=4)
    child = tracker.start_child(None, "run", cfg, tags={})
    batches({3: nan_at})
    _loss_times_at(monkeypatch, 9, 1000.0)
    res = train(cfg, log=child.log)
    child.finish(res, extra_tags={})
    child.terminate()
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["first_nonfinite_where"] == "model:input"
    assert run.data.tags["status"] == "recovered"

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(child.run_id, key)]

    assert history("nonfinite/events") == [(3, 1.0)]
    assert history("nonfinite/skipped_steps") == [(3, 1.0)]
    assert history("grad/spike_warnings") == [(9, 1.0)]  # (renamed: finite)
    assert history("train/lr") == []  # constant: not charted
    assert run.data.metrics["outcome.spikes"] == 1.0 and run.data.metrics["outcome.events_loss"] == 1.0
    path = client.download_artifacts(child.run_id, "nonfinite_events.csv", str(tmp_path))
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(EVENT_COLUMNS)
    # non-finite events only: a spike warning (finite gradient) has its own table
    assert [(r["step"], r["kind"], r["action"], r["where"]) for r in rows] == [
        ("3", "loss", "skipped", "model:input")]
    with open(client.download_artifacts(child.run_id, "grad_spikes.csv", str(tmp_path))) as fh:
        spikes = list(csv.DictReader(fh))
    assert [(r["step"], r["kind"], r["action"]) for r in spikes] == [("9", "grad_spike", "recorded")]
    assert rows[0]["nan"] == "1" and rows[0]["rows"] == "1" and rows[0]["recovered"] == "True"
    assert rows[0]["lead_up"].startswith("1:") and len(rows[0]["lead_up"].split()) == 2
