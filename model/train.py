"""train(cfg, data, log) -> TrainResult: one run of the chorus CNN.

`log(metrics, step)` is the only way out; the default does nothing, so tests and benchmarks need
no tracking server. Every step logs train/loss, train/grad_norm (pre-clip total norm),
train/lr and train/chorus_pct; every epoch val/loss, val/chorus_f1, val/chorus_pct, val/accuracy.

Non-finite checks cost nothing extra: the loss and the total grad norm are computed anyway (the
norm for clipping and logging), and both are read in the same single device sync that logging
needs. Only when one is non-finite does the loop do more work (check parameters, apply the policy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from model.cnn import ChorusCNN
from model.config import TrainConfig, resolve_device
from model.data import SongData, WindowSampler, eval_batches, make_data
from model.metrics import FrameCounts, count_frames, is_collapsed, masked_cross_entropy, predicted_chorus

LogFn = Callable[[dict[str, float], int], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    """The default `log`: drop everything."""


@dataclass
class NonFiniteEvent:
    """One step whose loss or grad norm was non-finite, and what the policy did about it."""

    step: int
    epoch: int
    kind: str  # "loss" | "grad_norm" | "params" | "val_outputs"
    action: str  # "stopped" | "skipped" | "zeroed"
    loss: float
    grad_norm: float


@dataclass
class TrainResult:
    """The outcome of one run. NaN where a value could not be measured (e.g. F1 after divergence)."""

    status: str  # converged | diverged | recovered | collapsed
    steps: int
    epochs: int
    first_nonfinite_step: Optional[int] = None
    nonfinite_events: int = 0
    skipped_steps: int = 0
    zeroed_steps: int = 0
    max_grad_norm: float = float("nan")
    final_grad_norm: float = float("nan")
    final_train_loss: float = float("nan")
    final_val_loss: float = float("nan")
    final_val_f1: float = float("nan")
    best_val_f1: float = float("nan")
    final_val_chorus_pct: float = float("nan")
    final_val_accuracy: float = float("nan")
    wall_time_s: float = 0.0
    steps_per_s: float = 0.0
    events: list[NonFiniteEvent] = field(default_factory=list)

    def outcome(self) -> dict[str, float]:
        """Numeric outcome fields (events excluded), for tables and trackers."""
        d = dataclasses.asdict(self)
        d.pop("events")
        d.pop("status")
        return {k: (float("nan") if v is None else float(v)) for k, v in d.items()}


def build_model(cfg: TrainConfig, n_features: int) -> ChorusCNN:
    cfg = dataclasses.replace(cfg, n_features=n_features) if n_features != cfg.n_features else cfg
    return ChorusCNN.from_config(cfg)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: ChorusCNN, batches, device: str) -> FrameCounts:
    """Frame counts and summed loss over every validation frame; one device sync."""
    was_training = model.training
    model.eval()
    total = None
    for b in batches:
        b = b.to(device)
        c = count_frames(model(b.x, b.mask), b.y, b.mask)
        total = c if total is None else total + c
    model.train(was_training)
    tp, fp, fn, tn, loss_sum = total.tolist()
    return FrameCounts(tp, fp, fn, tn, loss_sum)


def params_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def train(cfg: TrainConfig, data: SongData | None = None, log: LogFn = no_log) -> TrainResult:
    """Train one configuration and return its outcome. Deterministic on CPU for a given seed."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    data = data if data is not None else make_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.n_features).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sampler = WindowSampler(data.train, cfg.frames, cfg.batch_size, cfg.seed)
    val_batches = eval_batches(data.val, cfg.frames, cfg.batch_size)
    res = TrainResult(status="converged", steps=0, epochs=0)
    max_gn = -math.inf
    stopped = False
    step = 0
    t_loop = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for _ in range(cfg.steps_per_epoch):
            step += 1
            b = sampler.next().to(device)
            logits = model(b.x, b.mask)  # [B, T, 2]
            loss = masked_cross_entropy(logits, b.y, b.mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = get_total_norm(grads)  # pre-clip, computed even when clipping is off
            with torch.no_grad():
                pred = predicted_chorus(logits.detach()) & b.mask
                chorus_pct = 100.0 * pred.sum() / b.mask.sum().clamp_min(1)
            # The one device sync of the step: these values are logged anyway.
            loss_v, gn_v, pct_v = torch.stack(
                [loss.detach(), grad_norm, chorus_pct.to(loss.dtype)]).tolist()
            lr = opt.param_groups[0]["lr"]
            log({"train/loss": loss_v, "train/grad_norm": gn_v, "train/lr": lr,
                 "train/chorus_pct": pct_v}, step)
            res.final_train_loss, res.final_grad_norm = loss_v, gn_v

            if math.isfinite(loss_v) and math.isfinite(gn_v):
                max_gn = max(max_gn, gn_v)
                if cfg.grad_clip is not None:
                    clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            else:
                kind = "loss" if not math.isfinite(loss_v) else "grad_norm"
                res.nonfinite_events += 1
                if res.first_nonfinite_step is None:
                    res.first_nonfinite_step = step
                # Parameters that already went non-finite cannot be recovered by any policy.
                if cfg.nonfinite == "stop" or not params_finite(params):
                    kind = kind if params_finite(params) else "params"
                    res.events.append(NonFiniteEvent(step, epoch, kind, "stopped", loss_v, gn_v))
                    stopped = True
                    break
                if cfg.nonfinite == "skip":
                    res.skipped_steps += 1
                    res.events.append(NonFiniteEvent(step, epoch, kind, "skipped", loss_v, gn_v))
                    continue
                # "zero": the seed's NaN zeroing, then clip on the sanitised norm and step.
                for g in grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
                res.zeroed_steps += 1
                res.events.append(NonFiniteEvent(step, epoch, kind, "zeroed", loss_v, gn_v))
                if cfg.grad_clip is not None:
                    clip_grads_with_norm_(params, cfg.grad_clip, get_total_norm(grads))
            opt.step()
            if cfg.param_clamp is not None:
                with torch.no_grad():
                    torch._foreach_clamp_min_(params, -cfg.param_clamp)
                    torch._foreach_clamp_max_(params, cfg.param_clamp)
        res.steps = step
        if stopped:
            break
        res.epochs = epoch
        counts = evaluate(model, val_batches, device)
        if not math.isfinite(counts.loss()):
            # Parameters may be finite yet so large that the outputs are not (seen with skip/zero
            # at huge lr): the model is dead whatever the policy. That is divergence.
            res.nonfinite_events += 1
            res.first_nonfinite_step = res.first_nonfinite_step or step
            kind = "val_outputs" if params_finite(params) else "params"
            res.events.append(NonFiniteEvent(step, epoch, kind, "stopped",
                                             counts.loss(), res.final_grad_norm))
            log({"val/loss": counts.loss()}, step)
            stopped = True
            break
        f1 = counts.f1() if math.isfinite(counts.loss()) else float("nan")
        res.final_val_loss, res.final_val_f1 = counts.loss(), f1
        res.final_val_chorus_pct, res.final_val_accuracy = counts.chorus_pct(), counts.accuracy()
        if math.isfinite(f1):
            res.best_val_f1 = f1 if math.isnan(res.best_val_f1) else max(res.best_val_f1, f1)
        log({"val/loss": counts.loss(), "val/chorus_f1": f1, "val/chorus_pct": counts.chorus_pct(),
             "val/accuracy": counts.accuracy()}, step)

    if not stopped and not params_finite(params):  # e.g. a last step that overflowed
        stopped = True
        res.events.append(NonFiniteEvent(step, res.epochs, "params", "stopped",
                                         res.final_train_loss, res.final_grad_norm))
        res.nonfinite_events += 1
        res.first_nonfinite_step = res.first_nonfinite_step or step
    if stopped:
        res.status = "diverged"
        # A diverged model has no meaningful validation score: say so with NaN, not 0.
        res.final_val_loss = res.final_val_f1 = float("nan")
        res.final_val_chorus_pct = res.final_val_accuracy = float("nan")
    elif is_collapsed(res.final_val_chorus_pct):
        res.status = "collapsed"
    elif res.nonfinite_events:
        res.status = "recovered"
    res.max_grad_norm = max_gn if max_gn > -math.inf else float("nan")
    elapsed_loop = time.perf_counter() - t_loop
    res.wall_time_s = time.perf_counter() - t_start
    res.steps_per_s = res.steps / elapsed_loop if elapsed_loop > 0 else 0.0
    return res
