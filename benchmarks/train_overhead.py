#!/usr/bin/env python3
"""Overhead of model.train.train() over a bare training loop, as a steps/s ratio.

Run from the repository root:

    .venv/bin/python benchmarks/train_overhead.py [--repeats 7] [--steps 200]

What is compared (same process, same thread count: torch's default, not changed here):

  A  `model.train.train(cfg, data, log)`: per-step metrics (loss, pre-clip grad norm, chorus %),
     the one device sync per step that reads them, the non-finite checks, the log call,
     clipping via get_total_norm + clip_grads_with_norm_, optimizer step.
  B  a bare loop over the same model (ChorusCNN.from_config, same torch seed, so the same
     initial weights and dropout masks), the same batches (a WindowSampler with the same seed,
     sampled inside the loop as train() does), the same optimizer (build_optimizer), the same
     number of steps: forward, masked_cross_entropy, zero_grad, backward, clip_grad_norm_
     (grad_clip=0.5 of the default recipe), optimizer.step. Nothing else: no .item(), no
     metrics, no validation.

How train()'s time is measured (the honest part). train() also builds its model, optimizer and
validation windows and runs validation after every epoch; a wall-clock time around the call
would charge that to "overhead" although the bare loop does none of it. So:
  * the config is the default (fixed) recipe with epochs=1 and steps_per_epoch=--steps, so no
    validation happens between the first and the last training step;
  * train() is timed from the timestamps its `log` callback sees at the first and at the last
    training step ("train/loss" in the metrics). That interval holds exactly steps-1 complete
    step cycles (clip+step of step 1, steps 2..N-1, sample+forward+backward+metrics of step N);
    setup before step 1 and the validation after step N fall outside it.
  * the bare loop is timed from the end of its step 1 to the end of its step N: also steps-1
    complete cycles (with a device synchronize at both ends; a no-op on CPU).
The callback is not literally the no-op default: it appends one time.perf_counter() value when
it sees a training step (~0.1 us against a step of ~10-20 ms). train() builds the metrics dict
and calls `log` whatever `log` is, so everything train() itself does is inside the timing.

As a check that both arms do the same work, the last training loss of every bare repeat is
compared with TrainResult.final_train_loss of the train() repeats (same seed, same batches,
same dropout masks: they should agree to float precision).

Repeats are interleaved A, B, A, B, ... after one untimed warm-up of each. Per repeat we get
steps/s; the ratio reported is median(A steps/s) / median(B steps/s); the median of the
per-pair ratios is printed too. The machine is shared and noisy: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._env import code_state, load_average  # noqa: E402

import torch  # noqa: E402
from torch.nn.utils import clip_grad_norm_  # noqa: E402

from model.cnn import ChorusCNN  # noqa: E402
from model.config import TrainConfig, resolve_device  # noqa: E402
from model.data import WindowSampler, make_data  # noqa: E402
from model.metrics import masked_cross_entropy  # noqa: E402
from model.train import build_optimizer, train  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_train(cfg: TrainConfig, data) -> tuple[float, float]:
    """train() with a timestamping log; steps/s over steps 1..N (validation excluded)."""
    stamps: list[float] = []

    def log(metrics, step):  # noqa: ARG001
        if "train/loss" in metrics:
            stamps.append(time.perf_counter())

    res = train(cfg, data, log=log)
    if res.status == "diverged" or len(stamps) != cfg.steps_per_epoch:
        raise RuntimeError(f"train() did not run all steps: status={res.status}, "
                           f"stamps={len(stamps)}")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), res.final_train_loss


def run_bare(cfg: TrainConfig, data) -> tuple[float, float]:
    """The bare loop; steps/s over the end of step 1 .. the end of step N."""
    device = resolve_device(cfg.device)
    steps = cfg.epochs * cfg.steps_per_epoch
    torch.manual_seed(cfg.seed)
    model = ChorusCNN.from_config(dataclasses.replace(cfg, n_features=data.n_features)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sampler = WindowSampler(data.train, cfg.frames, cfg.batch_size, cfg.seed)
    model.train()
    t0 = 0.0
    for i in range(steps):
        b = sampler.next().to(device)
        logits = model(b.x, b.mask)
        loss = masked_cross_entropy(logits, b.y, b.mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if i == 0:
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    t1 = time.perf_counter()
    return (steps - 1) / (t1 - t0), loss.item()  # read after the timing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="A/B pairs (>= 5 recommended)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per repeat")
    args = ap.parse_args(argv)
    if args.steps < 3 or args.repeats < 1:
        ap.error("need --steps >= 3 and --repeats >= 1")

    base = TrainConfig()
    if base.grad_clip is None:
        raise SystemExit("the default recipe has no grad_clip; this benchmark assumes clipping")
    cfg = dataclasses.replace(base, epochs=1, steps_per_epoch=args.steps)
    data = make_data(cfg)  # cached; generated once, before any timing
    device = resolve_device(cfg.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"steps/repeat {args.steps}, pairs {args.repeats}, batch {cfg.batch_size}x{cfg.frames}, "
          f"optimizer {cfg.optimizer} lr {cfg.lr:g}, grad_clip {cfg.grad_clip}")
    print(code_state())
    print(f"load average at start: {load_average()}")

    # Untimed warm-up of both arms (allocator, kernels, first-call costs).
    warm = dataclasses.replace(cfg, steps_per_epoch=min(20, args.steps))
    run_train(warm, data)
    run_bare(warm, data)

    rows = []
    for r in range(args.repeats):
        a, loss_a = run_train(cfg, data)
        b, loss_b = run_bare(cfg, data)
        rows.append((a, b, loss_a, loss_b))

    print()
    print("| repeat | train() steps/s | bare steps/s | ratio |")
    print("|---:|---:|---:|---:|")
    for i, (a, b, _, _) in enumerate(rows, 1):
        print(f"| {i} | {a:.2f} | {b:.2f} | {a / b:.3f} |")
    med_a = statistics.median(r[0] for r in rows)
    med_b = statistics.median(r[1] for r in rows)
    pair = statistics.median(r[0] / r[1] for r in rows)
    print(f"| median | {med_a:.2f} | {med_b:.2f} | {pair:.3f} (median of pair ratios) |")
    print()
    same = all(math.isclose(la, lb, rel_tol=1e-4, abs_tol=1e-6) for _, _, la, lb in rows)
    la, lb = rows[-1][2], rows[-1][3]
    print(f"same work check: final train loss train()={la:.6f} bare={lb:.6f} -> "
          f"{'identical runs' if same else 'MISMATCH (arms differ)'}")
    print(f"load average at end: {load_average()}")
    print(f"train()/bare steps/s ratio: {med_a / med_b:.3f} (target >= 0.97)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
