"""CPU threads that behave on a busy machine: idle OpenMP threads sleep instead of spinning.

torch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels). Between two parallel regions
libgomp's idle threads spin for a while (300 000 spins by default) before they sleep. On an idle
machine that saves a wake-up; next to any other CPU-bound process each spinning thread takes a
time slice the other process needed, and the thread that has real work waits for one that is
spinning. A passive wait policy makes idle threads sleep at once. Measured on the shared 2-core
machine (benchmarks/busy_machine.py, 80 fixed-recipe steps, never truly idle: load ~3 from other
users): next to one more CPU hog, 2.7x slower with the default policy, 1.3x with the passive
one; without the hog the passive policy was 2x faster too (the other users' processes are hogs
as well). A truly idle machine was not available to measure the policy's price there, which
is a sleeping thread's wake-up (microseconds) per parallel region: re-run the benchmark on one.

OpenMP reads its environment once, when torch loads it: the policy must be in the environment
before torch is imported (runner.py sets it first thing) or in a child's environment before it
starts (local worker processes get it from `child_env`). A policy the user set
(OMP_WAIT_POLICY, or libgomp's GOMP_SPINCOUNT) is kept.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, MutableMapping

WAIT_POLICY = "PASSIVE"


def calm_openmp(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` unless the user chose a wait policy.

    Returns whether it was set. Only a process that has not loaded torch yet, or a child started
    with this environment, is affected."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


@contextlib.contextmanager
def child_env() -> Iterator[None]:
    """For starting worker processes: they inherit the passive policy even when this process
    (a library caller that imported torch first) runs without it; os.environ is restored."""
    added = calm_openmp()
    try:
        yield
    finally:
        if added:
            os.environ.pop("OMP_WAIT_POLICY", None)

