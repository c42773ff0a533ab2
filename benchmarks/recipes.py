#!/usr/bin/env python3
"""The honest measurement table: fixed vs all-broken vs leave-one-out recipes, and an lr ladder.

Run from the repository root (the full run takes 15-20 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/recipes.py                 > /tmp/recipes.txt
    .venv/bin/python benchmarks/recipes.py --quick         # fewer configs, a few minutes
    .venv/bin/python benchmarks/recipes.py --seeds 3 --ladder-seeds 2
    .venv/bin/python benchmarks/recipes.py --part ladder  # only the lr ladder (or --part recipes)

Tables go to stdout (Markdown); one progress line per run goes to stderr.

1. Baselines on the validation songs: constant-chorus F1 and a per-frame linear classifier.
2. Recipes, seeds 0..N-1 each (--seeds, default 5):
     fixed        TrainConfig() defaults (the seed's fixed recipe; nonfinite is now "zero")
     all-broken   classifier_bias=(0.02,0), param_clamp=0.5, residual_scale=0.1, norm=batch,
                  grad_clip=1.0, lr=1e-3, input_norm=False, nonfinite=stop
     -<fix>       leave-one-out: the fixed recipe with that one fix turned off (the seven fixes
                  of the brief, plus nan_zeroing -> nonfinite=stop since it is a default now)
   Columns: status counts, final val/chorus_f1 mean ± sd over the runs that did not diverge
   (a diverged run has no F1; how many diverged is in the counts; a non-diverged run whose F1
   is NaN is counted apart), mean max pre-clip grad norm, mean (and median) wall seconds of
   train() (wall time on a shared machine: the load average at start and end is printed).
3. Learning-rate ladder (1e-4 .. 10; the non-finite policy is each family's own), --ladder-seeds seeds each (default min(3, --seeds)):
     fixed, adamw, grad_clip=None    fixed, sgd (momentum 0.9), grad_clip=None
     all-broken, adamw (as defined: grad_clip=1.0)    all-broken, adamw, grad_clip=None
   Columns: status counts, mean F1 (non-diverged), per seed the first non-finite step and how
   many steps were non-finite ('-' = none), mean max grad norm (finite steps only). Nothing is tuned to produce a NaN: this is what happens.

HighLearningRateWarning is silenced here (the ladder is above the warning threshold on purpose).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ablations.design.fixes import FIXES as SEED_FIXES, fix_overrides  # noqa: E402
from benchmarks._env import code_state, load_average  # noqa: E402

from model.baselines import constant_chorus_f1, linear_frame_f1  # noqa: E402
import torch  # noqa: E402

from model.config import HighLearningRateWarning, TrainConfig, resolve_device  # noqa: E402
from model.data import make_data  # noqa: E402
from model.train import TrainResult, train  # noqa: E402

warnings.filterwarnings("ignore", category=HighLearningRateWarning)

BROKEN: dict[str, Any] = fix_overrides(baseline="broken")  # every fix and safeguard off
# Each fix of the seed, and the override that turns it off (back to the seed's broken value).
FIXES: list[tuple[str, dict[str, Any]]] = [(name, dict(fix.before))
                                          for name, fix in SEED_FIXES.items()]
LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]
QUICK_LADDER = [1e-3, 1e-1, 10.0]
STATUSES = ("converged", "recovered", "collapsed", "diverged")


def run_many(label: str, overrides: dict[str, Any], seeds: list[int], data) -> list[TrainResult]:
    out = []
    for s in seeds:
        cfg = dataclasses.replace(TrainConfig(), seed=s, **overrides)
        r = train(cfg, data)
        first = "-" if r.first_nonfinite_step is None else r.first_nonfinite_step
        print(f"  {label:<34} seed {s}: {r.status:<9} f1 {r.final_val_f1:.3f} "
              f"max_gn {r.max_grad_norm:.3g} first_nonfinite {first} steps {r.steps} "
              f"{r.wall_time_s:.1f}s", file=sys.stderr, flush=True)
        out.append(r)
    return out


def counts(results: list[TrainResult]) -> str:
    """converged/recovered/collapsed/diverged, plus any other status train() may return."""
    out = "/".join(str(sum(r.status == s for r in results)) for s in STATUSES)
    other = sorted({r.status for r in results} - set(STATUSES))
    return out + "".join(f" +{sum(r.status == o for r in results)} {o}" for o in other)


def f1_cell(results: list[TrainResult]) -> str:
    """mean ± sd of final F1 over non-diverged runs with a finite F1. Non-diverged runs whose F1
    is NaN (final validation loss non-finite although the parameters stayed finite) are counted
    separately, never averaged in and never hidden."""
    live = [r for r in results if r.status != "diverged"]
    f1 = [r.final_val_f1 for r in live if math.isfinite(r.final_val_f1)]
    n_div = sum(r.status == "diverged" for r in results)
    n_nan = len(live) - len(f1)
    notes = (f"; {n_div} diverged" if n_div else "") + (
        f"; {n_nan} not diverged but F1 NaN" if n_nan else "")
    if not f1:
        return f"- (n=0{notes})"
    sd = f"{statistics.stdev(f1):.3f}" if len(f1) > 1 else "-"
    return f"{statistics.fmean(f1):.3f} ± {sd} (n={len(f1)}{notes})"


def nonfinite_cell(results: list[TrainResult]) -> str:
    """Per seed: first non-finite step and, in brackets, the number of non-finite steps."""
    return ", ".join("-" if r.first_nonfinite_step is None
                     else f"{r.first_nonfinite_step} ({r.nonfinite_events}/{r.steps})"
                     for r in results)


def wall_cell(results: list[TrainResult]) -> str:
    w = [r.wall_time_s for r in results]
    return f"{statistics.fmean(w):.1f} ({statistics.median(w):.1f})"


def mean_finite(values: list[float], fmt: str = ".3g") -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return format(statistics.fmean(v), fmt) if v else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per recipe (default 5)")
    ap.add_argument("--ladder-seeds", type=int, default=None,
                    help="seeds per lr in the ladder (default min(3, --seeds))")
    ap.add_argument("--quick", action="store_true",
                    help="fewer configs: no leave-one-out rows, ladder lr in {1e-3, 1e-1, 10}")
    ap.add_argument("--part", choices=("all", "recipes", "ladder"), default="all",
                    help="run only the recipes table or only the lr ladder (default: all)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    ladder_seeds = args.ladder_seeds if args.ladder_seeds is not None else min(3, args.seeds)
    t_all = time.perf_counter()

    base = TrainConfig()
    data = make_data(base)
    n_train, n_val = len(data.train), len(data.val)
    print(f"# Recipes: {n_train} train / {n_val} val synthetic songs (data_seed {base.data_seed}), "
          f"{base.epochs} epochs x {base.steps_per_epoch} steps, batch {base.batch_size}x{base.frames}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {resolve_device(base.device)}")
    print(f"fixed recipe = TrainConfig() defaults: {base.to_dict()}")
    print(code_state())
    print(f"load average at start: {load_average()}")
    print()
    print("## Baselines (validation songs)")
    print()
    print("| baseline | val chorus F1 |")
    print("|---|---:|")
    print(f"| constant chorus (every frame) | {constant_chorus_f1(data):.3f} |")
    print(f"| linear per-frame (logistic regression, no context) | {linear_frame_f1(data):.3f} |")
    print(flush=True)

    seeds = list(range(args.seeds))
    if args.part != "ladder":
        recipes_table(args, seeds, data)
    if args.part != "recipes":
        ladder_tables(args, ladder_seeds, data)
    print(f"total time {time.perf_counter() - t_all:.0f} s; load average at end: {load_average()} "
          f"(wall seconds are inflated by other work on a shared machine)")
    return 0


def recipes_table(args: argparse.Namespace, seeds: list[int], data) -> None:
    recipes: list[tuple[str, dict[str, Any]]] = [("fixed (defaults)", {}), ("all-broken", BROKEN)]
    if not args.quick:
        recipes += [(f"fixed - {name} (off: {', '.join(f'{k}={v}' for k, v in o.items())})", o)
                    for name, o in FIXES]
    rows = [(label, run_many(label, o, seeds, data)) for label, o in recipes]
    print(f"## Recipes ({args.seeds} seeds each: {seeds[0]}..{seeds[-1]})")
    print()
    print("status counts = converged/recovered/collapsed/diverged; F1 = final val/chorus_f1, "
          "mean ± sd over non-diverged runs; max grad norm = pre-clip")
    print()
    print("| recipe | status counts | final val F1 | mean max grad norm | mean (median) wall s |")
    print("|---|---|---|---:|---:|")
    for label, res in rows:
        print(f"| {label} | {counts(res)} | {f1_cell(res)} | "
              f"{mean_finite([r.max_grad_norm for r in res])} | "
              f"{wall_cell(res)} |")
    print(flush=True)


def ladder_tables(args: argparse.Namespace, ladder_seeds: int, data) -> None:
    lrs = QUICK_LADDER if args.quick else LADDER
    lseeds = list(range(ladder_seeds))
    families: list[tuple[str, dict[str, Any]]] = [
        ("fixed, adamw, grad_clip=None", dict(grad_clip=None, optimizer="adamw")),
        ("fixed, sgd (momentum 0.9), grad_clip=None", dict(grad_clip=None, optimizer="sgd")),
        ("all-broken, adamw, as defined (grad_clip=1.0)", dict(BROKEN, optimizer="adamw")),
        ("all-broken, adamw, grad_clip=None", dict(BROKEN, optimizer="adamw", grad_clip=None)),
    ]
    print(f"## Learning-rate ladder ({ladder_seeds} seeds each: {lseeds[0]}..{lseeds[-1]})")
    print()
    for fam, over in families:
        print(f"### {fam}")
        print()
        print(f"nonfinite={dataclasses.replace(TrainConfig(), **over).nonfinite}")
        print()
        print("| lr | status counts | final val F1 | first non-finite step (non-finite steps/steps) "
              "per seed | mean max grad norm |")
        print("|---:|---|---|---|---:|")
        for lr in lrs:
            res = run_many(f"{fam[:22]} lr={lr:g}", dict(over, lr=lr), lseeds, data)
            print(f"| {lr:g} | {counts(res)} | {f1_cell(res)} | {nonfinite_cell(res)} | "
                  f"{mean_finite([r.max_grad_norm for r in res])} |", flush=True)
        print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
