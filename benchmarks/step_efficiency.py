#!/usr/bin/env python3
"""How close a training step at the defaults is to what this CPU can do, before vs after.

    PYTHONPATH=. python benchmarks/step_efficiency.py [--pairs 12] [--steps 5] [--runs 3]

One fixed-recipe step (TrainConfig() defaults: B 16, T 256, 64 features, 48 channels, 3 blocks,
AdamW, grad_clip): forward, masked_cross_entropy, backward, pre-clip grad norm, clip, optimizer
step, nothing else (the step of train() without its bookkeeping). Two arms, same process, same
threads, same batches, same initial weights:

  before  the network as it was (benchmarks/_cnn_before.py, a frozen copy of model/cnn.py: a
          [B,C,T] transpose around every Conv1d) with torch's default AdamW (a per-parameter loop)
  after   model/cnn.py (channels-last convolutions, no transposes) and model.train's
          build_optimizer (fused AdamW)

Printed, all in one run, every timing with the load average and the CPU time *other* processes
used while it ran (/proc/stat minus this process; "NOT idle" when it exceeds 0.1 CPUs):
  1. numerics: max |difference| of logits and of every gradient, old vs new network with the
     same weights (norm layer and batch), and of the losses of 10 training steps (both arms);
  2. the step's FLOPs (torch.utils.flop_counter.FlopCounterMode, forward + backward);
  3. the machine's own rates, measured interleaved with the steps: a 1024^3 GEMM, a GEMM of the
     convolution's shape ([B*T x k*C] x [k*C x C] = [4096x240]x[240x48]), and the step's seven
     convolutions alone (forward + backward, the new layout): the conv-only bound of a step;
  4. before/after: per-pair ratio of step times (median of `--pairs` interleaved pairs of
     `--steps` steps each) and each arm's GFLOP/s and share of the GEMM rate;
  5. a run through train() (validation every 40 steps, a log callback that keeps every metric,
     setup included: its wall_time_s per step) against the bare step, interleaved, `--runs` times.
The machine may be shared: read the ratios (measured side by side), not the absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._env import CpuWatch, code_state, load_average  # noqa: E402

import torch  # noqa: E402
from torch.nn.utils import clip_grads_with_norm_, get_total_norm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import benchmarks._cnn_before as before_cnn  # noqa: E402
import model.cnn as after_cnn  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.data import WindowSampler, make_data  # noqa: E402
from model.metrics import masked_cross_entropy  # noqa: E402
from model.train import build_optimizer, train  # noqa: E402

N_BATCHES = 10  # batches drawn once (sampling is not the step), cycled through


def old_optimizer(cfg: TrainConfig, params):
    """build_optimizer as it was: torch's default implementation (a loop over parameters on CPU)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


class Arm:
    """One network + optimizer, stepping through fixed batches."""

    def __init__(self, cnn, make_opt, cfg: TrainConfig, batches):
        torch.manual_seed(cfg.seed)
        self.model = cnn.ChorusCNN.from_config(cfg).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_opt(cfg, self.params)
        self.cfg, self.batches, self.i = cfg, batches, 0

    def step(self) -> torch.Tensor:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = masked_cross_entropy(self.model(b.x, b.mask), b.y, b.mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = get_total_norm([p.grad for p in self.params])
        if self.cfg.grad_clip is not None:
            clip_grads_with_norm_(self.params, self.cfg.grad_clip, gn)
        self.opt.step()
        return loss.detach()

    def steps(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        return (time.perf_counter() - t) / n


def numerics(cfg: TrainConfig, batches) -> None:
    """Old vs new network with the same weights: logits and gradients; then 10 training steps."""
    b = batches[0]
    for norm in ("layer", "batch"):
        c = dataclasses.replace(cfg, norm=norm)
        torch.manual_seed(0)
        old = before_cnn.ChorusCNN.from_config(c)
        new = after_cnn.ChorusCNN.from_config(c)
        new.load_state_dict(old.state_dict())  # same names and shapes, or this raises
        outs = []
        for m in (old, new):
            torch.manual_seed(1)  # the same dropout masks (each draws in its old layout)
            y = m(b.x, b.mask)
            g = torch.autograd.grad(masked_cross_entropy(y, b.y, b.mask), list(m.parameters()))
            outs.append((y.detach(), g))
        dy = (outs[0][0] - outs[1][0]).abs().max().item()
        dg = max((a - c).abs().max().item() for a, c in zip(outs[0][1], outs[1][1]))
        gmax = max(a.abs().max().item() for a in outs[0][1])
        print(f"  norm={norm}: max|logits| {outs[0][0].abs().max().item():.3g}, max|d logits| "
              f"{dy:.2e}; max|grad| {gmax:.3g}, max|d grad| {dg:.2e} (train mode, dropout on)")
    losses = []
    for cnn, make_opt in ((before_cnn, old_optimizer), (after_cnn, build_optimizer)):
        arm = Arm(cnn, make_opt, cfg, batches)  # seeds: the same weights and dropout masks
        losses.append([arm.step().item() for _ in range(10)])
    rel = [abs(x - y) / abs(x) for x, y in zip(*losses)]
    print(f"  10 training steps from the same seed: max relative loss difference {max(rel):.2e} "
          f"(step 1 {rel[0]:.1e}, step 10 {rel[-1]:.1e}); last loss {losses[0][-1]:.6f} vs "
          f"{losses[1][-1]:.6f}")


def step_flops(arm: Arm) -> int:
    b = arm.batches[0]
    with FlopCounterMode(display=False) as fc:
        loss = masked_cross_entropy(arm.model(b.x, b.mask), b.y, b.mask)
        loss.backward()
    arm.opt.zero_grad(set_to_none=True)
    return fc.get_total_flops()


class Rates:
    """The machine's own rates: GEMMs and the step's convolutions alone."""

    def __init__(self, cfg: TrainConfig, model: after_cnn.ChorusCNN):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        k, c, n = cfg.kernel_size, cfg.hidden_dim, cfg.batch_size * cfg.frames
        self.ca, self.cb = torch.randn(n, k * c, generator=g), torch.randn(k * c, c, generator=g)
        self.convs = [m for m in model.modules() if isinstance(m, after_cnn.ChannelsLastConv1d)]
        self.xs = [torch.randn(cfg.batch_size, cfg.frames, m.in_channels, generator=g)
                   .requires_grad_(i > 0)  # the stem's input (the data) needs no gradient
                   for i, m in enumerate(self.convs)]
        self.gemm_flops = 2 * 1024 ** 3
        self.cgemm_flops = 2 * n * k * c * c
        with FlopCounterMode(display=False) as fc:
            self._convs()
        self.conv_flops = fc.get_total_flops()

    def _convs(self) -> None:
        for m, x in zip(self.convs, self.xs):
            y = m(x)
            y.backward(torch.ones_like(y))

    def time(self, what: str, n: int) -> float:
        fn = {"gemm": lambda: torch.mm(self.a, self.b), "cgemm": lambda: torch.mm(self.ca, self.cb),
              "convs": self._convs}[what]
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n


def med(xs):
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12, help="interleaved before/after pairs")
    ap.add_argument("--steps", type=int, default=5, help="steps per arm per pair")
    ap.add_argument("--runs", type=int, default=3, help="train() vs bare-step pairs (0: skip)")
    args = ap.parse_args(argv)
    cfg0 = TrainConfig()
    data = make_data(cfg0)  # cached; before any timing
    cfg = dataclasses.replace(cfg0, n_features=data.n_features)
    sampler = WindowSampler(data.train, cfg.frames, cfg.batch_size, cfg.seed)
    batches = [sampler.next() for _ in range(N_BATCHES)]
    print(f"{code_state()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load "
          f"{load_average()}; step: B {cfg.batch_size}, T {cfg.frames}, F {cfg.n_features}, "
          f"C {cfg.hidden_dim}, {cfg.n_blocks} blocks, k {cfg.kernel_size}, {cfg.optimizer}")

    print("1. numerics, before vs after:")
    numerics(cfg, batches)

    arms = {"before": Arm(before_cnn, old_optimizer, cfg, batches),
            "after": Arm(after_cnn, build_optimizer, cfg, batches)}
    flops = {k: step_flops(a) for k, a in arms.items()}
    print(f"2. step FLOPs (forward + backward): before {flops['before'] / 1e9:.3f} GFLOP, after "
          f"{flops['after'] / 1e9:.3f} GFLOP")
    rates = Rates(cfg, arms["after"].model)
    for a in arms.values():  # warm up (oneDNN primitives, allocator)
        a.steps(3)

    t: dict[str, list[float]] = {k: [] for k in ("before", "after", "gemm", "cgemm", "convs")}
    others, idle_pairs = [], 0
    for _ in range(args.pairs):
        with CpuWatch() as w:
            for k in ("before", "after"):
                t[k].append(arms[k].steps(args.steps))
            for k, n in (("gemm", 3), ("cgemm", 20), ("convs", args.steps)):
                t[k].append(rates.time(k, n))
        others.append(w.other_cpus)
        idle_pairs += w.idle
    ratios = [b / a for b, a in zip(t["before"], t["after"])]
    r_gemm = rates.gemm_flops / med(t["gemm"]) / 1e9
    r_cgemm = rates.cgemm_flops / med(t["cgemm"]) / 1e9
    r_conv = rates.conv_flops / med(t["convs"]) / 1e9
    print(f"3. machine, medians of {args.pairs} (interleaved with 4): 1024^3 GEMM {r_gemm:.0f} "
          f"GFLOP/s; conv-shaped GEMM [{rates.ca.shape[0]}x{rates.ca.shape[1]}]x"
          f"[{rates.cb.shape[0]}x{rates.cb.shape[1]}] {r_cgemm:.0f} GFLOP/s; the step's "
          f"{len(rates.convs)} convolutions alone (fwd+bwd) {rates.conv_flops / 1e9:.3f} GFLOP in "
          f"{med(t['convs']) * 1e3:.1f} ms = {r_conv:.0f} GFLOP/s (the conv-only bound of a step)")
    print(f"4. step, median of {args.pairs} interleaved pairs of {args.steps} steps "
          f"[load {load_average()}; other processes {min(others):.2f}-{max(others):.2f} CPUs, "
          f"median {med(others):.2f}; {idle_pairs}/{args.pairs} pairs idle]:")
    for k in ("before", "after"):
        gf = flops[k] / med(t[k]) / 1e9
        print(f"  {k:<6} {med(t[k]) * 1e3:6.1f} ms  {gf:5.1f} GFLOP/s = {100 * gf / r_gemm:3.0f} % of "
              f"the GEMM rate, {100 * gf / r_cgemm:3.0f} % of the conv-shaped GEMM; step / conv-only "
              f"bound {med(t[k]) / med(t['convs']):.2f}x")
    print(f"  after is {med(ratios):.2f}x faster (median of per-pair ratios; quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.2f}-{statistics.quantiles(ratios, n=4)[2]:.2f})"
          if len(ratios) > 1 else f"  after is {ratios[0]:.2f}x faster (one pair)")

    if args.runs:
        steps = 2 * cfg0.steps_per_epoch
        rcfg = dataclasses.replace(cfg0, epochs=2)  # validation every steps_per_epoch, as defaults
        per_run, per_bare, ro = [], [], []
        for _ in range(args.runs):
            kept: list = []
            with CpuWatch() as w:
                res = train(rcfg, data, log=lambda m, s: kept.append((s, m)))
                per_run.append(res.wall_time_s / res.steps)
                per_bare.append(arms["after"].steps(steps))
            ro.append(w.other_cpus)
        rr = [r / b for r, b in zip(per_run, per_bare)]
        print(f"5. train() ({steps} steps, {rcfg.epochs + 1} validations, logging, setup; wall_time_s "
              f"per step) / bare step, after, {args.runs} interleaved pairs: median {med(rr):.2f}x "
              f"({med(per_run) * 1e3:.1f} vs {med(per_bare) * 1e3:.1f} ms) [load {load_average()}; "
              f"other processes median {med(ro):.2f} CPUs]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
