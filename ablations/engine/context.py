"""What a worker process is given: the study, both stores, where and how it trains.

Its own module so that the worker (which runs trials) and the trial code (which reads the
context) both import it, instead of importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ablations.design.spec import StudySpec


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker process needs (picklable)."""

    spec: StudySpec
    storage_url: str
    tracking_uri: str
    parent_run_id: Optional[str]
    deadline: Optional[float] = None  # time.time() after which no new run starts
    threads: Optional[int] = None  # torch threads (workers on one machine split the cores)
    # Before each run, lower the threads to the cores other processes leave free (at most
    # `threads`); False pins `threads` (runner.py worker --threads N). ablations/engine/torch_setup.py
    fit_threads: bool = True
    device: Optional[str] = None  # overrides every run's `device` (e.g. cuda:1), not its identity
    wait: bool = True  # with nothing queued, wait for runs in flight elsewhere (re-run if lost)
    announce_wait: bool = True  # say so (not for local workers: siblings finishing is normal)
    ensemble: str = "auto"  # seeds of a cell as one vectorised ensemble: auto (CUDA only) | on | off
