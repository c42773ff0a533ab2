#!/usr/bin/env python3
"""Steady-state cost of non-finite detection in train(): steps/s with it on vs off, vs anomaly
mode always on, vs checking every activation and gradient (the seed's approach), side by side.

Run from the repository root:

    .venv/bin/python benchmarks/nonfinite_overhead.py [--repeats 5] [--steps 150] [--threads N]

Arms (same process, same config, same seed, so the same batches, dropout masks and weights):

  off      TrainConfig(forensics=False, spike_factor=None, lead_up=0): none of the per-step
           work of model/nonfinite.py. What stays is the check train() has always had: the loss
           and the pre-clip grad norm, read in the step's one device sync (logged anyway).
  on       the defaults: forensics=True (the dropout RNG state is copied every step so that a
           replay sees the same masks), the lead-up ring buffer (K=10), the grad-norm spike check
           (10x the running median of 50). No event happens, so no replay runs: this is the cost
           a healthy run pays.
  anomaly  `off` run inside torch.autograd.set_detect_anomaly(True, check_nan=True): PyTorch's
           own way to find where a NaN came from, left on for the whole run.
  per-tensor  `off` plus a finiteness check (`isfinite(t).all()`, one host read each) on every
           module output and every parameter gradient, every step: the seed's "comprehensive
           tensor checking". Installed with hooks on the model train() builds.

How time is measured. The config is the default recipe with epochs=1 and steps_per_epoch=--steps.
Each run's `log` callback timestamps every training step; the differences are complete step
cycles (model construction and the validation after the last step fall outside). Arms are
interleaved (on, off, anomaly, per-tensor, on, ...) after one untimed warm-up of each. This
machine is shared (2 cores, often several other jobs), and other jobs only ever *add* time to a
step, so the table reports, per arm, steps/s from the median step time and from the 10th
percentile step time over all rounds (the latter is the least disturbed estimate), and the
median of per-round wall-clock ratios. The final training loss of every run is compared:
detection must not change the run.

Then, measured in isolation (no noise from the step around them), the per-step additions of the
`on` arm in microseconds, and the one-off costs that only an event pays: a forensic replay of one
batch (forward and backward under hooks on every module and parameter; the worst case, where
nothing is found early), the same with anomaly mode, and a rollback snapshot (take + restore).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import model.train as train_mod  # noqa: E402
from model.config import TrainConfig, resolve_device  # noqa: E402
from model.data import WindowSampler, make_data  # noqa: E402
from model.metrics import masked_cross_entropy  # noqa: E402
from model.nonfinite import Monitor, Snapshot, replay, rng_state  # noqa: E402

ARMS = ("on", "off", "anomaly", "per-tensor")


def per_tensor_checks(model: torch.nn.Module) -> None:
    """The seed's approach: every module output and parameter gradient checked, every step."""

    def check(t: torch.Tensor) -> None:
        if not bool(torch.isfinite(t).all()):  # a device sync per tensor
            raise FloatingPointError("non-finite tensor")

    for mod in model.modules():
        mod.register_forward_hook(lambda m, a, out: check(out))
    for p in model.parameters():
        p.register_hook(check)


def run(arm: str, cfg_on: TrainConfig, cfg_off: TrainConfig, data) -> tuple[list[float], float]:
    """One train() run of an arm: the duration of every complete step cycle, the final loss."""
    stamps: list[float] = []

    def log(metrics, step):  # noqa: ARG001
        if "train/loss" in metrics:
            stamps.append(time.perf_counter())

    cfg = cfg_on if arm == "on" else cfg_off
    real_build = train_mod.build_model
    if arm == "per-tensor":
        def build(c, n):
            m = real_build(c, n)
            per_tensor_checks(m)
            return m
        train_mod.build_model = build
    ctx = (torch.autograd.set_detect_anomaly(True, check_nan=True) if arm == "anomaly"
           else contextlib.nullcontext())
    try:
        with ctx:
            res = train_mod.train(cfg, data, log=log)
    finally:
        train_mod.build_model = real_build
    if res.status == "diverged" or len(stamps) != cfg.steps_per_epoch or res.events:
        raise RuntimeError(f"{arm}: not a clean run: status={res.status}, steps={len(stamps)}, "
                           f"events={len(res.events)}")
    return [b - a for a, b in zip(stamps, stamps[1:])], res.final_train_loss


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def per_step_additions(device: str, n: int = 20000) -> dict[str, float]:
    """Microseconds per call of what the `on` arm adds to every step, timed in isolation."""
    mon = Monitor(lead_up=10, spike_factor=10.0, spike_window=50, log=lambda m, s: None)
    for i in range(60):  # a full window, as in steady state
        mon.step(i, 0.5, 1.0, 5e-4)
        mon.is_spike(1.0 + 0.01 * (i % 7))
    out = {}
    t0 = time.perf_counter()
    for _ in range(n):
        rng_state(device)
    out["rng_state (dropout RNG copy)"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        mon.step(i, 0.5, 1.0, 5e-4)
    out["Monitor.step (lead-up ring)"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        mon.is_spike(1.0 + 0.01 * (i % 7))
    out["Monitor.is_spike (median of 50)"] = (time.perf_counter() - t0) / n * 1e6
    return out


def one_off_costs(cfg: TrainConfig, data, repeats: int = 5) -> dict[str, float]:
    """Median ms of a replay (with and without anomaly mode) and of a snapshot take + restore."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = train_mod.build_model(cfg, data.n_features).to(device)
    opt = train_mod.build_optimizer(cfg, [p for p in model.parameters()])
    b = WindowSampler(data.train, cfg.frames, cfg.batch_size, cfg.seed).next().to(device)
    model.train()
    loss = masked_cross_entropy(model(b.x, b.mask), b.y, b.mask)
    loss.backward()
    opt.step()  # so that the optimizer has state to copy
    out: dict[str, list[float]] = {"replay": [], "replay + anomaly": [], "snapshot take+restore": []}
    snap = Snapshot()
    for _ in range(repeats):
        rng = rng_state(device)
        for name, anomaly in (("replay", False), ("replay + anomaly", True)):
            t0 = time.perf_counter()
            found = replay(model, b, masked_cross_entropy, rng, device, anomaly_mode=anomaly)
            out[name].append(time.perf_counter() - t0)
            assert found.stage == "not_reproduced"  # a finite batch: every hook ran to the end
        t0 = time.perf_counter()
        snap.take(1, model, opt)
        snap.restore(model, opt, lr_factor=1.0)
        out["snapshot take+restore"].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds of all arms (>= 5 recommended)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per run")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 avoids threads spinning against "
                         "other jobs on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 3 or args.repeats < 1:
        ap.error("need --steps >= 3 and --repeats >= 1")

    cfg_on = dataclasses.replace(TrainConfig(), epochs=1, steps_per_epoch=args.steps)
    cfg_off = dataclasses.replace(cfg_on, forensics=False, spike_factor=None, lead_up=0)
    data = make_data(cfg_on)  # cached; generated once, before any timing
    device = resolve_device(cfg_on.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"steps/run {args.steps}, rounds {args.repeats}, batch {cfg_on.batch_size}x"
          f"{cfg_on.frames}, hidden {cfg_on.hidden_dim}x{cfg_on.n_blocks} blocks, "
          f"dropout {cfg_on.dropout}")

    warm_on = dataclasses.replace(cfg_on, steps_per_epoch=min(20, args.steps))
    warm_off = dataclasses.replace(cfg_off, steps_per_epoch=min(20, args.steps))
    for arm in ARMS:
        run(arm, warm_on, warm_off, data)

    print()
    print("per round, wall-clock steps/s over the whole run:")
    print("| round | " + " | ".join(ARMS) + " | on/off | anomaly/off | per-tensor/off |")
    print("|---:|" + "---:|" * (len(ARMS) + 3), flush=True)
    steps: dict[str, list[float]] = {a: [] for a in ARMS}
    losses: dict[str, list[float]] = {a: [] for a in ARMS}
    ratios: dict[str, list[float]] = {a: [] for a in ARMS}
    for i in range(1, args.repeats + 1):
        sps = {}
        for arm in ARMS:
            d, loss = run(arm, cfg_on, cfg_off, data)
            steps[arm] += d
            losses[arm].append(loss)
            sps[arm] = len(d) / sum(d)
        for arm in ARMS:
            ratios[arm].append(sps[arm] / sps["off"])
        print(f"| {i} | " + " | ".join(f"{sps[a]:.2f}" for a in ARMS) + " | "
              + " | ".join(f"{sps[a] / sps['off']:.3f}" for a in ("on", "anomaly", "per-tensor"))
              + " |", flush=True)

    med = {a: 1 / statistics.median(steps[a]) for a in ARMS}
    p10 = {a: 1 / _pct(steps[a], 0.10) for a in ARMS}
    print()
    print(f"over all {len(steps['off'])} step cycles per arm:")
    print("| arm | steps/s (median step) | steps/s (10th pct step) | ratio to off (median) | "
          "ratio to off (10th pct) | median of per-round ratios |")
    print("|---|---:|---:|---:|---:|---:|")
    for a in ARMS:
        print(f"| {a} | {med[a]:.2f} | {p10[a]:.2f} | {med[a] / med['off']:.3f} | "
              f"{p10[a] / p10['off']:.3f} | {statistics.median(ratios[a]):.3f} |")
    print()
    same = all(l == losses["off"] for l in losses.values())
    print("same run check: final train loss " + ", ".join(f"{a}={losses[a][-1]:.6f}" for a in ARMS)
          + f" -> {'identical in every arm and round' if same else 'MISMATCH'}")
    print(f"detection on/off steps/s:   {med['on'] / med['off']:.3f} (median step), "
          f"{p10['on'] / p10['off']:.3f} (10th pct step); target >= 0.99")
    print(f"anomaly mode always on/off: {med['anomaly'] / med['off']:.3f} (median step), "
          f"{p10['anomaly'] / p10['off']:.3f} (10th pct step)")
    print(f"per-tensor checks/off:      {med['per-tensor'] / med['off']:.3f} (median step), "
          f"{p10['per-tensor'] / p10['off']:.3f} (10th pct step)")

    step_us = 1e6 / p10["off"]
    print()
    print(f"per-step additions of `on`, timed in isolation (a step is {step_us / 1000:.1f} ms here, "
          f"10th pct):")
    adds = per_step_additions(device)
    for name, us in adds.items():
        print(f"  {name:<34} {us:6.2f} us")
    total = sum(adds.values())
    print(f"  {'total':<34} {total:6.2f} us = {100 * total / step_us:.3f} % of a step "
          f"-> expected on/off {step_us / (step_us + total):.4f}")
    print()
    print("one-off costs, paid only at an event:")
    for name, ms in one_off_costs(cfg_on, data).items():
        print(f"  {name:<22} {ms:7.1f} ms = {ms / (step_us / 1000):5.1f} steps")
    return 0 if same and math.isfinite(total) else 1


if __name__ == "__main__":
    raise SystemExit(main())
