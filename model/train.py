"""train(cfg, data, log) -> TrainResult: one run of a recipe (the chorus CNN by default): the
shared loop every recipe gets (model/recipe.py); the recipe gives its model, data and loss.

`log(metrics, step)` is the only way out; the default does nothing, so tests and benchmarks need
no tracking server. Every step logs train/loss, train/grad_norm (pre-clip total norm),
train/lr and train/chorus_pct (and the recipe's curves, e.g. train/attn_logit); every epoch
val/loss, val/chorus_f1, val/chorus_pct, val/accuracy; and at the steps where they change the
counts nonfinite/events, nonfinite/skipped_steps and nonfinite/spikes (never logged in a run
without events).

Non-finite checks cost nothing extra: the loss and the total grad norm are computed anyway (the
norm for clipping and logging), and both are read in the same single device sync that logging
needs. Only when one is non-finite does the loop do more work: check the parameters, replay the
batch to find where it went non-finite (model/nonfinite.py), apply the policy. Per step it also
keeps the lead-up floats, the spike check and the dropout RNG state (all host-side, no sync).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from model.config import LoopConfig, resolve_device
from model.data import Batch, SongData, WindowSampler, eval_batches
from model.metrics import FrameCounts, count_frames, is_collapsed, predicted_chorus
from model.nonfinite import (MAX_ROLLBACKS, Forensics, Monitor, NonFiniteEvent, Snapshot,
                             locate_eval, locate_params, replay, rng_state, uses_rng)
from model.recipe import recipe_for

__all__ = ["LogFn", "NonFiniteEvent", "Run", "TrainResult", "no_log", "train"]

LogFn = Callable[[dict[str, float], int], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    """The default `log`: drop everything."""


@dataclass
class TrainResult:
    """The outcome of one run. NaN where a value could not be measured (e.g. F1 after divergence)."""

    status: str  # converged | diverged | recovered | collapsed
    steps: int
    epochs: int
    first_nonfinite_step: Optional[int] = None
    first_nonfinite_where: str = ""  # "module:stage" (a string: a tag, not in outcome())
    nonfinite_events: int = 0
    events_loss: int = 0  # non-finite events by kind ...
    events_grad_norm: int = 0
    events_params: int = 0
    events_val_outputs: int = 0
    recovered_events: int = 0  # ... of which the next `lead_up` steps were finite
    skipped_steps: int = 0  # updates skipped (non-finite, or a spike under spike_action=skip)
    scaler_skips: int = 0  # fp16: steps the GradScaler skipped (scaled grads overflowed; not events)
    zeroed_steps: int = 0
    rollbacks: int = 0
    spikes: int = 0  # grad-norm spike warnings
    max_grad_norm: float = float("nan")
    final_grad_norm: float = float("nan")
    final_train_loss: float = float("nan")
    final_val_loss: float = float("nan")
    final_val_f1: float = float("nan")
    best_val_f1: float = float("nan")
    final_val_chorus_pct: float = float("nan")
    final_val_accuracy: float = float("nan")
    init_loss: float = float("nan")  # training loss of step 1, before any update
    # validation loss of the initial model, before any update: LR sensitivity's l0 (Wortsman et
    # al. 2023), measured on the same frames as final_val_loss, so the two are like for like
    init_val_loss: float = float("nan")
    wall_time_s: float = 0.0
    steps_per_s: float = 0.0
    events: list[NonFiniteEvent] = field(default_factory=list)
    # the recipe's curves (model/recipe.py), summarised: peak_<name> (the largest finite value of
    # the run) and final_<name> (the last step's); none for the chorus CNN
    curves: dict[str, float] = field(default_factory=dict)

    def outcome(self) -> dict[str, float]:
        """Numeric outcome fields (events excluded), for tables and trackers."""
        d = dataclasses.asdict(self)
        for k in ("events", "status", "first_nonfinite_where", "curves"):
            d.pop(k)
        d.update(self.curves)
        return {k: (float("nan") if v is None else float(v)) for k, v in d.items()}


def build_model(cfg: LoopConfig, n_features: int) -> torch.nn.Module:
    """The recipe's model for `cfg` (the chorus CNN for a TrainConfig), on the CPU."""
    return recipe_for(cfg).build_model(cfg, n_features)


class NoChorusWarning(UserWarning):
    """The validation split has no chorus frame: chorus F1 is undefined there."""


def build_optimizer(cfg: LoopConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # Adam(W)'s fused kernel: one kernel for all parameters instead of ~10 small ones each (the
    # per-parameter loop torch uses on CPU by default); the same update to float rounding
    # (benchmarks/step_efficiency.py). It exists on CPU and CUDA only; None elsewhere = default.
    fused = True if params and params[0].device.type in ("cpu", "cuda") else None
    if cfg.optimizer == "adamw":
        # AdamW decays by lr_t x weight_decay; independent decay is weight_decay x lr_t / lr
        # (the schedule's factor, not the lr itself): the same call with weight_decay / lr.
        wd = cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "independent" else cfg.weight_decay
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd, eps=cfg.adam_eps,
                                 betas=(0.9, cfg.adam_beta2), fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
                                betas=(0.9, cfg.adam_beta2), fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def autocast(cfg: LoopConfig, device: str) -> Callable[[], ContextManager]:
    """A factory of the run's autocast context (a no-op in fp32)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)


def grad_scaler(cfg: LoopConfig, device: str) -> Optional[torch.amp.GradScaler]:
    """fp16 scales the loss so small gradients do not underflow (CUDA, and CPU in torch >= 2.3)."""
    return torch.amp.GradScaler(torch.device(device).type) if cfg.precision == "fp16" else None


def lr_factor(cfg: LoopConfig, step: int, total_steps: int) -> float:
    """Multiplier of cfg.lr at `step` (1-based): linear warmup, then the decay of lr_schedule."""
    if step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = (step - 1 - cfg.warmup_steps) / span  # 0 at the first step after warmup, < 1 at the last
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: str,
             amp: Callable[[], ContextManager] = contextlib.nullcontext) -> FrameCounts:
    """Frame counts and summed loss over every validation frame; one device sync."""
    was_training = model.training
    model.eval()
    total = None
    for b in batches:
        b = b.to(device)
        with amp():
            logits = model(b.x, b.mask)
        c = count_frames(logits.float(), b.y, b.mask)
        total = c if total is None else total + c
    model.train(was_training)
    tp, fp, fn, tn, loss_sum = total.tolist()
    return FrameCounts(tp, fp, fn, tn, loss_sum)


def params_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _record(res: TrainResult, mon: Monitor, ev: NonFiniteEvent,
            found: Optional[Forensics]) -> None:
    """Add an event to the result and the monitor (lead-up, recovery, curves)."""
    if found is not None:
        ev.forensics, ev.where = found, found.where
    mon.record(ev)
    res.events.append(ev)
    res.skipped_steps += ev.action == "skipped"
    res.rollbacks += ev.action == "rolled_back"
    if ev.kind == "grad_spike":
        res.spikes += 1
        return
    res.nonfinite_events += 1
    setattr(res, f"events_{ev.kind}", getattr(res, f"events_{ev.kind}") + 1)
    if res.first_nonfinite_step is None:
        res.first_nonfinite_step, res.first_nonfinite_where = ev.step, ev.where


def _action(cfg: LoopConfig, params_ok: bool, res: TrainResult) -> str:
    """What the policy does with a non-finite step."""
    if cfg.nonfinite == "rollback":
        return "rolled_back" if res.rollbacks < MAX_ROLLBACKS else "stopped"
    # Parameters that already went non-finite cannot be recovered by stop, skip or zero.
    if cfg.nonfinite == "stop" or not params_ok:
        return "stopped"
    return "skipped" if cfg.nonfinite == "skip" else "zeroed"



@torch.no_grad()
def apply_update(cfg: LoopConfig, params: list[torch.nn.Parameter], grad_norm: torch.Tensor,
                 step: Callable[[], None]) -> None:
    """Clip the gradients to cfg.grad_clip by their pre-clip norm, `step` the optimizer, clamp the
    parameters to +-cfg.param_clamp. `grad_norm` is a scalar, or one norm per member of an
    ensemble whose parameters are stacked [M, ...] (model/ensemble.py): each member is clipped
    by its own norm, with the coefficient clip_grads_with_norm_ computes."""
    if cfg.grad_clip is not None:
        if grad_norm.dim() == 0:
            clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
        else:
            coef = torch.clamp(cfg.grad_clip / (grad_norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))
    step()
    if cfg.param_clamp is not None:
        torch._foreach_clamp_min_(params, -cfg.param_clamp)
        torch._foreach_clamp_max_(params, cfg.param_clamp)

def train(cfg: LoopConfig, data: SongData | None = None, log: LogFn = no_log) -> TrainResult:
    """Train one configuration of its recipe (the config's class names it: TrainConfig is the
    chorus CNN) and return its outcome. Deterministic on CPU for a given seed."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    data = data if data is not None else recipe_for(cfg).make_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.n_features).to(device)
    run = Run(cfg, data, model, device, log, t_start)
    if run.val_chorus_pct == 0.0:
        warnings.warn(f"the validation split ({len(data.val)} song(s)) has no chorus frame: chorus "
                      f"F1 is undefined (reported as NaN), and predicting no chorus there is not "
                      f"a collapse", NoChorusWarning, stacklevel=2)
    return run.run_from()


class Run:
    """The state of one run between steps, so that a run can go on from mid-way: train() runs
    one from step 0; model/ensemble.py trains members together through the step's parts below
    and hands a member back to run_from at the step (or validation) where it needs what only
    this loop does."""

    def __init__(self, cfg: LoopConfig, data: SongData, model: torch.nn.Module, device: str,
                 log: LogFn, t_start: float):
        self.cfg, self.model, self.device, self.log, self.t_start = cfg, model, device, log, t_start
        recipe = recipe_for(cfg)
        self.loss_fn = recipe.loss(cfg)
        self.curves = tuple(recipe.curves.items())  # (name, model attribute)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(cfg, self.params)
        self.amp, self.scaler = autocast(cfg, device), grad_scaler(cfg, device)
        self.sampler = WindowSampler(data.train, cfg.frames, cfg.batch_size, cfg.seed)
        self.val_batches = eval_batches(data.val, cfg.frames, cfg.batch_size)
        self.res = TrainResult(status="converged", steps=0, epochs=0, curves={
            f"{k}_{name}": math.nan for name, _ in self.curves for k in ("peak", "final")})
        # Eval mode, no grad: touches no RNG, no BatchNorm statistic, no optimizer state, so the
        # run that follows is the same run as without it.
        self.res.init_val_loss = evaluate(model, self.val_batches, device, self.amp).loss()
        self.val_chorus_pct = 100.0 * float(np.mean(np.concatenate([s.labels for s in data.val])))
        self.mon = Monitor(cfg.lead_up, cfg.spike_factor, cfg.spike_window, log)
        self.keep_rng = cfg.forensics and uses_rng(model)  # a replay needs the step's dropout masks
        self.snapshot = Snapshot() if cfg.nonfinite == "rollback" else None
        if self.snapshot is not None:
            self.snapshot.take(0, model, self.opt)
        self.last_update: tuple[int, Optional[Batch]] = (0, None)  # step and batch of the latest update
        self.total_steps = cfg.epochs * cfg.steps_per_epoch
        self.scheduled = cfg.warmup_steps > 0 or cfg.lr_schedule != "constant"
        self.lr_mult = 1.0  # halved by each rollback
        self.max_gn = -math.inf
        self.stopped = False
        self.step = 0
        self.t_loop = 0.0

    def event(self, kind: str, action: str, epoch: int, loss_v: float, gn_v: float,
              locate: Callable[[], Optional[Forensics]]) -> None:
        """Record a non-finite event (forensics first, while the state is the failing one)."""
        found = locate() if self.cfg.forensics else None
        _record(self.res, self.mon, NonFiniteEvent(self.step, epoch, kind, action, loss_v, gn_v,
                                                   self.opt.param_groups[0]["lr"]), found)
        self.mon.emit(self.step)

    def locate_bad_params(self) -> Optional[Forensics]:
        return locate_params(self.model, self.opt, self.last_update[1], self.last_update[0],
                             self.cfg.param_clamp)

    def run_from(self, epoch: int = 1, done: int = 0,
                 spent: Optional[tuple[float, float]] = None) -> TrainResult:
        """Train from `done` steps into `epoch` (done = steps_per_epoch: from its validation) to
        the end and return the outcome; train() starts at step 0. `spent`: (seconds since the run
        began, seconds of them in the loop) of a run trained elsewhere until now (an ensemble
        member going on alone), so that its timings count that time."""
        cfg = self.cfg
        if spent is not None:
            self.t_start, self.t_loop = time.perf_counter() - spent[0], spent[1]
        self.t_loop = time.perf_counter() - self.t_loop  # t_loop holds the loop time so far
        for epoch in range(epoch, cfg.epochs + 1):
            self.model.train()
            for _ in range(done, cfg.steps_per_epoch):
                if self.train_step(epoch):
                    break
            done = 0
            if self.stopped:
                self.res.steps = self.step
                break
            self.end_epoch(epoch)
            if self.validate(epoch):
                break
        return self.finish()

    def train_step(self, epoch: int) -> bool:
        """One step of the loop; True when the run stopped."""
        self.begin_step()
        b = self.sampler.next().to(self.device)
        rng = rng_state(self.device) if self.keep_rng else None  # a replay redraws its dropout
        loss, grads, grad_norm, chorus_pct = self.forward_backward(b)
        # The one device sync of the step: these values are logged anyway.
        loss_v, gn_v, pct_v, *curves = torch.stack(
            [loss.detach().float(), grad_norm.float(), chorus_pct.float(),
             *self.curve_values()]).tolist()
        self.after_sync(loss_v, gn_v, pct_v, curves)
        if self.scaler_overflowed(loss_v, gn_v):  # fp16: the scaler's own skip, not an event
            return False
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)):  # cfg.nonfinite decides
            return self.nonfinite_step(epoch, b, rng, grads, loss_v, gn_v)
        if self.spike_skips(epoch, loss_v, gn_v):  # recorded; spike_action=skip drops the update
            self.skip_update()
            return False
        if self.snapshot_due():
            self.take_snapshot()  # the pre-update state of a finite step
        self.apply_update(grad_norm, b)
        return False

    # ---------------------------------------------------------------- the step's parts
    # train_step above is the whole step; model/ensemble.py calls the same parts for the members
    # it trains together, so each rule (schedule, logging, spikes, snapshots, clip, clamp) is
    # written once.
    def begin_step(self) -> float:
        """Count the step and set its learning rate (warmup, schedule, halved per rollback);
        returns it."""
        self.step += 1
        if self.scheduled:
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * self.lr_mult * lr_factor(self.cfg, self.step, self.total_steps)
        return self.opt.param_groups[0]["lr"]

    def forward_backward(self, b: Batch) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor,
                                                  torch.Tensor]:
        """Loss, gradients (unscaled), their pre-clip total norm and the batch's chorus %."""
        with self.amp():
            logits = self.model(b.x, b.mask)  # [B, T, 2]
            loss = self.loss_fn(logits, b.y, b.mask)
        self.opt.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # clip, log and check the true gradients
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = get_total_norm(grads)  # pre-clip, computed even when clipping is off
        with torch.no_grad():
            pred = predicted_chorus(logits.detach()) & b.mask
            chorus_pct = 100.0 * pred.sum() / b.mask.sum().clamp_min(1)
        return loss, grads, grad_norm, chorus_pct

    def curve_values(self) -> list[torch.Tensor]:
        """The recipe's curves as the last forward left them (0-dim tensors; no sync here)."""
        return [getattr(self.model, attr).detach().float().reshape(()) for _, attr in self.curves]

    def after_sync(self, loss_v: float, gn_v: float, pct_v: float,
                   curves: Sequence[float] = ()) -> None:
        """The step's values once on the host: logged, kept in the result, fed to the monitor
        (lead-up of a later event, the spike median)."""
        step, lr, res = self.step, self.opt.param_groups[0]["lr"], self.res
        named = {f"train/{name}": v for (name, _), v in zip(self.curves, curves)}
        self.log({"train/loss": loss_v, "train/grad_norm": gn_v, "train/lr": lr,
                  "train/chorus_pct": pct_v, **named}, step)
        for (name, _), v in zip(self.curves, curves):
            res.curves[f"final_{name}"] = v
            peak = res.curves.get(f"peak_{name}", math.nan)
            if math.isfinite(v) and not v <= peak:  # (NaN peak: the first finite value)
                res.curves[f"peak_{name}"] = v
        res.final_train_loss, res.final_grad_norm = loss_v, gn_v
        if step == 1:
            res.init_loss = loss_v
        self.mon.step(step, loss_v, gn_v, lr)

    def needs_solo(self, loss_v: float, gn_v: float) -> bool:
        """Whether this step needs more than the common finite update: a non-finite loss or grad
        norm (the non-finite policy) or a spike that the spike policy skips."""
        return not (math.isfinite(loss_v) and math.isfinite(gn_v)) or (
            self.cfg.spike_action == "skip" and self.mon.would_spike(gn_v))

    def scaler_overflowed(self, loss_v: float, gn_v: float) -> bool:
        """fp16: the *scaled* gradients overflowed. GradScaler skips the step and halves its scale:
        its normal working, not a non-finite event. At a scale <= 1 the gradients overflow
        unscaled: that is real and goes to the non-finite policy."""
        if not (self.scaler is not None and math.isfinite(loss_v) and not math.isfinite(gn_v)
                and self.scaler.get_scale() > 1.0):
            return False
        self.res.scaler_skips += 1
        self.finish_update()
        self.log({"nonfinite/scaler_skips": float(self.res.scaler_skips)}, self.step)
        return True

    def spike_skips(self, epoch: int, loss_v: float, gn_v: float) -> bool:
        """A finite step: its grad norm counts for max_grad_norm, and a spike is recorded; True
        when spike_action says to skip its update."""
        self.max_gn = max(self.max_gn, gn_v)
        if not self.mon.is_spike(gn_v):
            return False
        skip = self.cfg.spike_action == "skip"
        _record(self.res, self.mon, NonFiniteEvent(self.step, epoch, "grad_spike",
                                                   "skipped" if skip else "recorded", loss_v,
                                                   gn_v, self.opt.param_groups[0]["lr"]), None)
        self.mon.emit(self.step)
        return skip

    def snapshot_due(self) -> bool:
        return self.snapshot is not None and self.step % self.cfg.rollback_every == 0

    def take_snapshot(self) -> None:
        """Keep the current (pre-update) state for a rollback, if its parameters are finite."""
        if params_finite(self.params):
            self.snapshot.take(self.step, self.model, self.opt)

    def skip_update(self) -> None:
        """No update this step (the scaler still moves on: its scale is kept per step)."""
        if self.scaler is not None:
            self.scaler.update()

    def apply_update(self, grad_norm: torch.Tensor, b: Batch, bypass_scaler: bool = False) -> None:
        """Clip by the pre-clip norm, step, clamp (apply_update); `b` is kept for forensics."""
        apply_update(self.cfg, self.params, grad_norm, lambda: self.finish_update(bypass_scaler))
        self.updated(b)

    def updated(self, b: Batch) -> None:
        """This step's update was applied (from batch `b`): a later parameter check names it."""
        self.last_update = (self.step, b)

    def end_epoch(self, epoch: int) -> None:
        self.res.steps, self.res.epochs = self.step, epoch

    def finish_update(self, bypass_scaler: bool = False) -> None:
        """Step the optimizer (through the scaler unless the grads were sanitised by hand)."""
        if self.scaler is None or bypass_scaler:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
        if self.scaler is not None:
            self.scaler.update()

    def nonfinite_step(self, epoch: int, b: Batch, rng: Optional[torch.Tensor],
                       grads: list[torch.Tensor], loss_v: float, gn_v: float) -> bool:
        """The non-finite policy (cfg.nonfinite) on a step whose loss or grad norm is not
        finite; True when the run stopped."""
        cfg, res = self.cfg, self.res
        params_ok = params_finite(self.params)
        kind = "params" if not params_ok else "loss" if not math.isfinite(loss_v) else "grad_norm"
        action = _action(cfg, params_ok, res)

        def locate() -> Optional[Forensics]:  # parameters are still pre-step here
            if not params_ok:
                return self.locate_bad_params()
            with self.amp():
                return replay(self.model, b, self.loss_fn, rng, self.device, cfg.anomaly_mode)

        self.event(kind, action, epoch, loss_v, gn_v, locate)
        if action == "stopped":
            self.stopped = True
            return True
        if action == "zeroed":
            # "zero": the seed's NaN zeroing, then clip on the sanitised norm and step.
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            res.zeroed_steps += 1
            self.apply_update(get_total_norm(grads), b, bypass_scaler=True)
            return False
        if action == "rolled_back":
            self.snapshot.restore(self.model, self.opt)
            self.lr_mult *= 0.5
        self.skip_update()
        return False

    def validate(self, epoch: int, counts: Optional[FrameCounts] = None) -> bool:
        """The validation after `epoch` (`counts`: already evaluated); True when the run stopped."""
        cfg, model, res, amp, step = self.cfg, self.model, self.res, self.amp, self.step
        counts = counts if counts is not None else evaluate(model, self.val_batches, self.device, amp)
        rolled = False
        while not math.isfinite(counts.loss()):
            # Parameters may be finite yet so large that the outputs are not (seen with skip/zero
            # at huge lr): the model is dead whatever the policy, unless it can be rolled back.
            params_ok = params_finite(self.params)

            def locate_val() -> Optional[Forensics]:
                if not params_ok:
                    return self.locate_bad_params()
                with amp():
                    return locate_eval(model, self.val_batches, self.device)

            # A rollback is tried once: if the restored state fails validation too, it is stopped.
            action = ("rolled_back" if not rolled and _action(cfg, True, res) == "rolled_back"
                      else "stopped")
            self.event("val_outputs" if params_ok else "params", action, epoch, counts.loss(),
                       res.final_grad_norm, locate_val)
            if action == "stopped":
                self.log({"val/loss": counts.loss()}, step)
                self.stopped = True
                return True
            self.snapshot.restore(model, self.opt)
            self.lr_mult *= 0.5
            rolled = True
            counts = evaluate(model, self.val_batches, self.device, amp)
        f1 = counts.f1() if math.isfinite(counts.loss()) else float("nan")
        res.final_val_loss, res.final_val_f1 = counts.loss(), f1
        res.final_val_chorus_pct, res.final_val_accuracy = counts.chorus_pct(), counts.accuracy()
        if math.isfinite(f1):
            res.best_val_f1 = f1 if math.isnan(res.best_val_f1) else max(res.best_val_f1, f1)
        self.log({"val/loss": counts.loss(), "val/chorus_f1": f1,
                  "val/chorus_pct": counts.chorus_pct(), "val/accuracy": counts.accuracy()}, step)
        return False

    def finish(self) -> TrainResult:
        """The end of training: the last parameter check, the status, the timings."""
        res = self.res
        if not self.stopped and not params_finite(self.params):  # e.g. a parameter no output depends on
            self.stopped = True
            self.event("params", "stopped", res.epochs, res.final_train_loss, res.final_grad_norm,
                       self.locate_bad_params)
        self.mon.close(self.stopped)
        res.recovered_events = sum(e.recovered is True for e in res.events if e.kind != "grad_spike")
        if self.stopped:
            res.status = "diverged"
            # A diverged model has no meaningful validation score: say so with NaN, not 0.
            res.final_val_loss = res.final_val_f1 = float("nan")
            res.final_val_chorus_pct = res.final_val_accuracy = float("nan")
        elif is_collapsed(res.final_val_chorus_pct, self.val_chorus_pct):
            res.status = "collapsed"
        elif res.nonfinite_events:
            res.status = "recovered"
        res.max_grad_norm = self.max_gn if self.max_gn > -math.inf else float("nan")
        elapsed_loop = time.perf_counter() - self.t_loop
        res.wall_time_s = time.perf_counter() - self.t_start
        res.steps_per_s = res.steps / elapsed_loop if elapsed_loop > 0 else 0.0
        return res
