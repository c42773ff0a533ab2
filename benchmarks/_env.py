"""Shared by the benchmarks: what code and what machine load a number was measured under."""

from __future__ import annotations

import os
import subprocess
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
