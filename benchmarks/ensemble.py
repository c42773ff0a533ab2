#!/usr/bin/env python3
"""Runs/hour of the seeds of one cell trained as a vectorised ensemble vs one run at a time.

    PYTHONPATH=. python benchmarks/ensemble.py                      # CPU, M = 3 and 8
    PYTHONPATH=. python benchmarks/ensemble.py --device cuda --members 3 8 32
    PYTHONPATH=. python benchmarks/ensemble.py --steps 40 --repeats 2 --set norm=batch

Same cell (the fixed recipe unless --set), M seeds, the same data; "separate" is train() on each
seed in turn, "ensemble" is model.ensemble.train_ensemble(ensemble=True). Both are timed side by
side in one process, alternating which goes first on each repeat (the machine is noisy); the
ratio is ensemble runs/hour over separate runs/hour, from the total time of each, and the median
of the per-repeat ratios (robuster on a shared machine). The status of
each member is printed for both, as a check that the two did the same runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._env import code_state, load_average  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--members", type=int, nargs="+", default=[3, 8], help="ensemble sizes M")
    ap.add_argument("--steps", type=int, default=20, help="steps per run (2 epochs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig override of the cell (repeatable)")
    args = ap.parse_args()
    import torch

    from model.config import ConfigError, TrainConfig
    from model.data import make_data
    from model.ensemble import train_ensemble
    from model.train import train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    try:
        over = dict(kv.split("=", 1) for kv in args.set)
        base = TrainConfig.from_overrides({**over, "device": args.device, "epochs": 2,
                                           "steps_per_epoch": max(1, args.steps // 2)})
    except (ConfigError, ValueError) as e:
        print(f"bad --set: {e}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{dev}; torch {torch.__version__}; {code_state()}; load {load_average()}")
    print(f"cell: {', '.join(args.set) or 'fixed recipe'}; {base.epochs * base.steps_per_epoch} "
          f"steps a run, batch {base.batch_size}")
    data = make_data(base)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    cfgs0 = [dataclasses.replace(base, seed=s) for s in range(2)]
    train(cfgs0[0], data)  # warm-up: allocator, kernels, vmap's first trace
    train_ensemble(cfgs0, data, ensemble=True)
    print(f"{'M':>3} {'separate s':>11} {'ensemble s':>11} {'separate runs/h':>16} "
          f"{'ensemble runs/h':>16} {'ratio':>6} {'median':>6}  ratio per repeat, statuses equal")
    for m in args.members:
        cfgs = [dataclasses.replace(base, seed=s) for s in range(m)]
        t_sep, t_ens, ratios = [], [], []
        same = True
        for r in range(args.repeats):
            for which in (("sep", "ens") if r % 2 == 0 else ("ens", "sep")):
                sync()
                t = time.perf_counter()
                if which == "sep":
                    sep = [train(c, data) for c in cfgs]
                else:
                    ens = train_ensemble(cfgs, data, ensemble=True)
                sync()
                (t_sep if which == "sep" else t_ens).append(time.perf_counter() - t)
            ratios.append(t_sep[-1] / t_ens[-1])
            same &= [x.status for x in sep] == [x.status for x in ens]
        n, ts, te = m * args.repeats, sum(t_sep), sum(t_ens)
        print(f"{m:>3} {ts:>11.2f} {te:>11.2f} {3600 * n / ts:>16.0f} {3600 * n / te:>16.0f} "
              f"{ts / te:>5.2f}x {statistics.median(ratios):>5.2f}x  "
              f"{' '.join(f'{x:.2f}' for x in ratios)}, {same}", flush=True)
    print(f"load at end {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
