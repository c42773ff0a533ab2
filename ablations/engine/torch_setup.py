"""CPU threads that are free on an idle machine and fair on a busy one.

Two measured choices (benchmarks/busy_machine.py, 80 fixed-recipe steps, the shared 2-core
machine checked idle from /proc/stat; numbers in README.md "Threads and devices"):

1. **How idle OpenMP threads wait.** torch's CPU kernels run on OpenMP (GNU libgomp in the pip
   wheels). Between two parallel regions libgomp's idle threads spin 300 000 times before they
   sleep, which takes time slices from any other busy process; sleeping at once
   (OMP_WAIT_POLICY=PASSIVE, what this project set before) pays a wake-up per parallel region:
   1.21x slower on an idle machine. A bounded spin, GOMP_SPINCOUNT=1000 (a few microseconds,
   about the gap between two kernels of a step), ran idle at 0.99x the default; 100 spins cost
   1.12x, 10 000 spun against a hog as badly as the default.
2. **How many threads.** Next to one CPU hog on 2 cores, *every* wait policy with 2 threads ran
   6.3-9 s where 1 thread ran 3.6 s: a thread that shares its core with the hog holds up the
   other at every barrier, so the run goes at the speed of the descheduled one. So before each
   run a worker sets torch's threads to the cores other processes left free during the last
   window (`FreeCores`: the machine's busy time from /proc/stat minus this process's own), up
   to its share of the machine. One hog: 1 thread, 1.2x the idle time instead of 2.5x.

   The thread count changes a run's floats in the last digits (a different reduction order, as
   model/ensemble.py measures for 1 vs 2 threads), never its identity: each run's MLflow tag
   `threads` says what it trained with, and `runner.py worker --threads N` pins the count for
   bit-for-bit repeats.

OpenMP reads its environment once, when torch loads it: the wait policy must be in the
environment before torch is imported (runner.py sets it first thing) or in a child's environment
before it starts (local worker processes get it from `child_env`). A policy the user set
(OMP_WAIT_POLICY, or libgomp's GOMP_SPINCOUNT) is kept.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator, MutableMapping, Optional

SPIN_POLICY = {"GOMP_SPINCOUNT": "1000"}


def calm_openmp(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the bounded spin in `environ` unless the user chose a wait policy. Returns whether it
    was set. Only a process that has not loaded torch yet, or a child started with this
    environment, is affected."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ.update(SPIN_POLICY)
    return True


@contextlib.contextmanager
def child_env() -> Iterator[None]:
    """For starting worker processes: they inherit the bounded spin even when this process
    (a library caller that imported torch first) runs without it; os.environ is restored."""
    added = calm_openmp()
    try:
        yield
    finally:
        if added:
            for k in SPIN_POLICY:
                os.environ.pop(k, None)


def cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, n or 1)


def _busy_ticks() -> Optional[int]:
    """Busy clock ticks of all CPUs since boot (/proc/stat: all but idle and iowait); None where
    there is no /proc/stat (not Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4]  # user nice system idle iowait irq softirq steal


def _own_cpu_s() -> float:
    t = os.times()  # all of this process's threads (not its unwaited children: other workers)
    return t.user + t.system


class FreeCores:
    """How many CPUs other processes kept busy since the last look, and so how many are free.

    A window is the time between two looks: for a worker, the run it just trained (and its
    bookkeeping), or its start-up before the first run. Ticks are 1/100 s, so a window shorter
    than MIN_WINDOW_S says nothing and the previous answer stands."""

    MIN_WINDOW_S = 0.5

    def __init__(self) -> None:
        self.others: Optional[float] = None  # CPUs others used in the last full window
        self._mark()

    def _mark(self) -> None:
        self._t, self._busy, self._own = time.perf_counter(), _busy_ticks(), _own_cpu_s()

    def look(self) -> Optional[float]:
        """Update `others` from the window since the last look (if long enough); return it."""
        wall = time.perf_counter() - self._t
        if wall < self.MIN_WINDOW_S:
            return self.others
        busy, own = _busy_ticks(), _own_cpu_s()
        if busy is not None and self._busy is not None:
            hz = os.sysconf("SC_CLK_TCK")
            self.others = max(0.0, (busy - self._busy) / hz - (own - self._own)) / wall
        self._mark()
        return self.others

    def threads(self, cap: int) -> int:
        """Threads for the next run: the cores others left free (a hog squeezed to 2/3 of a core
        by our own spinning threads still counts as one), at least 1 and at most `cap`."""
        others = self.look()
        if others is None:  # unknown (no /proc/stat): this process's share, as before
            return cap
        free = cores() - math.floor(others + 0.5)
        return max(1, min(cap, free))


_FREE = FreeCores()  # its first window starts when runner.py (or a worker process) imports this


def fit_threads(cap: int) -> int:
    """Set torch's CPU threads for the next run to the free cores (at most `cap`); returns them."""
    import torch

    n = _FREE.threads(cap)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
