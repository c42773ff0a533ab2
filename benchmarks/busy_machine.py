#!/usr/bin/env python3
"""How much slower a run gets next to a CPU hog, before and after the passive OpenMP wait policy.

    python benchmarks/busy_machine.py [--steps 80] [--repeats 3] [--hogs 1] [--one-thread]

Each measurement is a fresh Python process that trains the fixed recipe for `--steps` steps
(epochs of 40 steps, the default `steps_per_epoch`) on the CPU with torch's default thread count,
and reports the time inside `model.train.train()` (data, steps, validation). The processes
differ only in their environment:

  before  OpenMP's default wait policy (OMP_WAIT_POLICY / GOMP_SPINCOUNT unset): what runner.py
          and its worker processes ran with before the fix
  after   the environment runner.py now sets before torch loads (ablations.engine.torch_setup.calm_openmp:
          OMP_WAIT_POLICY=PASSIVE)

each on an idle machine and next to `--hogs` CPU hogs (`while True: pass` processes this script
starts and stops itself), interleaved: before/after idle, then before/after busy, per repeat.
Printed: medians, the slowdown busy/idle of each (target: no worse than the hog's fair share,
about 2x with one hog on 2 cores) and after/before ratios (idle: the price of the fix, if any).
`--one-thread` adds an `after` arm with torch.set_num_threads(1), for comparison.

The machine is shared: the load average is printed with every number; other users' processes
count as hogs too, so re-run when the `idle` load average is not near 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablations.engine.torch_setup import calm_openmp  # noqa: E402
from benchmarks._env import code_state, load_average  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from model.config import TrainConfig
from model.train import train
if {threads}:
    torch.set_num_threads({threads})
cfg = TrainConfig(epochs={epochs}, steps_per_epoch={spe}, device="cpu")
t = time.perf_counter()
res = train(cfg)
print(json.dumps({{"s": time.perf_counter() - t, "steps": res.steps,
                  "threads": torch.get_num_threads(), "status": res.status}}))
"""


def env_for(arm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                            "OMP_NUM_THREADS")}
    if arm.startswith("after"):
        calm_openmp(env)
    return env


def measure(arm: str, steps: int) -> dict:
    spe = 40 if steps % 40 == 0 else steps
    code = CHILD.format(root=str(ROOT), threads=1 if arm == "after_1thread" else 0,
                        epochs=steps // spe, spe=spe)
    out = subprocess.run([sys.executable, "-c", code], env=env_for(arm), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=1)
    ap.add_argument("--one-thread", action="store_true", help="add an `after` arm with 1 thread")
    args = ap.parse_args()
    arms = ["before", "after"] + (["after_1thread"] if args.one_thread else [])
    print(f"{code_state()}; {os.cpu_count()} cores; load {load_average()}; {args.steps} fixed-recipe "
          f"steps per run; busy = next to {args.hogs} CPU hog(s)")
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for where in ("idle", "busy"):
            started = hogs(args.hogs) if where == "busy" else []
            try:
                if started:
                    time.sleep(0.5)  # let the hogs get going
                for arm in arms:
                    m = measure(arm, args.steps)
                    times.setdefault((arm, where), []).append(m["s"])
                    print(f"  repeat {r} {where:<4} {arm:<13} {m['s']:6.2f} s  ({m['steps']} steps, "
                          f"{m['threads']} threads)  [load {load_average()}]", flush=True)
            finally:
                stop(started)
        time.sleep(1.0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian of {args.repeats} (s):   idle    busy   busy/idle")
    for arm in arms:
        print(f"  {arm:<13}       {med[arm, 'idle']:6.2f}  {med[arm, 'busy']:6.2f}   "
              f"{med[arm, 'busy'] / med[arm, 'idle']:5.2f}x")
    b, a = med["before", "busy"] / med["before", "idle"], med["after", "busy"] / med["after", "idle"]
    print(f"slowdown next to {args.hogs} hog(s): before {b:.2f}x, after {a:.2f}x (target: no worse "
          f"than the hogs' fair share, ~2x for one hog on 2 cores)")
    print(f"after/before: idle {med['after', 'idle'] / med['before', 'idle']:.2f}x the time, "
          f"busy {med['after', 'busy'] / med['before', 'busy']:.2f}x the time")
    print(f"load at the end {load_average()}")


if __name__ == "__main__":
    main()
