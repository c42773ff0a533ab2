"""Shared by the benchmarks: what code and what machine load a number was measured under."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def code_state() -> str:
    """The commit and whether model/ has uncommitted edits."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "model"], cwd=root,
                               text=True, capture_output=True, check=True).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except (OSError, subprocess.CalledProcessError):
        return "code: git state unknown"
    return f"code: HEAD {head}" + (f", uncommitted in model/: {', '.join(dirty)}" if dirty else
                                   ", model/ clean")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]  # user nice system idle iowait irq softirq steal


class CpuWatch:
    """How much CPU *other* processes used during a `with` block: the machine's busy time
    (/proc/stat) minus this process's own and its waited-for children's (os.times()).

    `other_cpus` is in CPUs (0.0: none; 1.0: one core's worth, e.g. one hog). Clock ticks are
    1/100 s, so a block shorter than ~1 s reads +-0.02 CPUs of noise per tick; `idle` allows 0.1.
    Without /proc/stat (not Linux) other_cpus is NaN and `idle` False: never claimed idle."""

    IDLE_BELOW = 0.10

    def __enter__(self) -> "CpuWatch":
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0, self.own0 = time.perf_counter(), self._own()
        self.busy0 = self._busy()
        return self

    def __exit__(self, *exc) -> None:
        busy1, own1, t1 = self._busy(), self._own(), time.perf_counter()
        self.wall = t1 - self.t0
        if busy1 is None or self.busy0 is None:
            self.other_cpus = float("nan")
        else:
            other_s = (busy1 - self.busy0) / self.hz - (own1 - self.own0)
            self.other_cpus = max(0.0, other_s) / self.wall

    @staticmethod
    def _busy():
        try:
            return _busy_ticks()
        except OSError:
            return None

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @property
    def idle(self) -> bool:
        return self.other_cpus < self.IDLE_BELOW

    def __str__(self) -> str:
        return f"others used {self.other_cpus:.2f} CPUs" + ("" if self.idle else " (NOT idle)")
