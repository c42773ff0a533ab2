"""A study: its plan of runs, its Optuna study in the storage, and the stores checked before work.

A study file becomes one Optuna study (ablations/engine/queue.py says how its runs are queued and
claimed). What a study runs is its `Plan`, chosen once from the design: the fixed runs of a grid
design (every cell x seed) or `trials` cells sampled by Optuna (search), each trained at every
seed. Code that must treat the two differently asks the plan (`plan.search`), never the design.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import optuna

from ablations.design import designs
from ablations.design.designs import PlannedRun
from ablations.design.spec import StudySpec
from ablations.tracking.retry import StoreError, describe_error
from ablations.engine.storage import open_storage, safe_url

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and fail_stale_trials are marked experimental (since Optuna 2.9); we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We keep our own heartbeat thread around study.ask(); Optuna warns that ask() has none.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


@dataclass(frozen=True)
class Plan:
    """The runs of a study file: every run (cell x seed) of a grid design, enqueued once; or,
    for a search design, none fixed: `spec.trials` cells are sampled, each trained at every seed
    (a trial is then one cell, and its value the mean over the seeds)."""

    spec: StudySpec
    runs: tuple[PlannedRun, ...]  # () for a search design

    @property
    def search(self) -> bool:
        return self.spec.design == "search"

    @property
    def total(self) -> int:
        """What `done` counts up to: runs, or for a search design trials."""
        return (self.spec.trials or 0) if self.search else len(self.runs)

    @property
    def unit(self) -> str:
        return "trials" if self.search else "runs"

    @functools.cached_property  # (hashing every run's config: seconds for 10 000-run plans)
    def keys(self) -> frozenset[str]:
        """Every run's key, and its legacy key (designs.legacy_key): trials queued or finished
        under either are this plan's."""
        return frozenset(k for r in self.runs for k in (r.run_key, r.legacy_key))

    def counts(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether a trial is one of this plan's (a grid study's store may hold runs of cells
        or seeds since dropped from the file; every trial of a search study counts)."""
        return self.search or trial.user_attrs.get("run_key") in self.keys

    def __iter__(self) -> Iterator[PlannedRun]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, i: int) -> PlannedRun:
        return self.runs[i]


def plan_of(spec: StudySpec) -> Plan:
    return Plan(spec, () if spec.design == "search" else tuple(designs.runs(spec)))


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.design == "search" and spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=0, n_startup_trials=min(10, max(2, (spec.trials or 10) // 3)))
    return optuna.samplers.RandomSampler(seed=0)


def load_study(spec: StudySpec, storage: optuna.storages.BaseStorage,
               create: bool = False) -> optuna.Study:
    if create:
        study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                                    direction=spec.direction, sampler=_sampler(spec))
        if study.metric_names != [spec.objective_metric]:  # optuna-dashboard's axis label
            study.set_metric_names([spec.objective_metric])
        return study
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec))


def open_study(spec: StudySpec, storage_url: str,
               create: bool) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """Open (or with `create`, create) the study; one-line StoreErrors. Opening an existing
    study never leaves an empty SQLite database behind where there was none."""
    if not create and storage_url.startswith("sqlite:///") and \
            not os.path.exists(storage_url[len("sqlite:///"):]):
        raise StoreError(f"study {spec.name!r} not found: {safe_url(storage_url)} does not exist; "
                         f"start it with `python runner.py run {spec.source}` first")
    try:
        storage = open_storage(storage_url)
        study = load_study(spec, storage, create=create)
    except StoreError:
        raise
    except KeyError:
        raise StoreError(f"study {spec.name!r} not found in {safe_url(storage_url)}; start it with "
                         f"`python runner.py run {spec.source} --storage {safe_url(storage_url)}` first") from None
    except Exception as e:
        raise StoreError(f"--storage {safe_url(storage_url)}: cannot open the Optuna storage "
                         f"({describe_error(e)})") from None
    if create and study.direction.name.lower() != spec.direction:
        raise StoreError(f"{spec.source}: objective.direction is {spec.direction} but study "
                         f"{spec.name!r} in {safe_url(storage_url)} was created with "
                         f"{study.direction.name.lower()}; use another name or storage")
    return storage, study


def check_tracking(tracking_uri: str) -> None:
    """Fail before any training if the MLflow store cannot be reached (one line)."""
    from ablations.tracking.tracker import check_reachable

    try:
        check_reachable(tracking_uri)
    except Exception as e:
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: " + _tracking_refusal(e)) from None


def _tracking_refusal(e: Exception) -> str:
    """Why the tracking store said no, in words: a team server (`mlflow server --app-name
    basic-auth`) answers 401 to missing or wrong credentials and 403 to a user without access."""
    msg = str(e)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "error code 401" in msg:
        return ("the tracking server refused the credentials (HTTP 401): "
                + (f"check MLFLOW_TRACKING_PASSWORD for user {user!r}" if user and
                   os.environ.get("MLFLOW_TRACKING_PASSWORD") else
                   "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"))
    if "error code 403" in msg:
        return (f"user {user!r} may not use this tracking server's experiments (HTTP 403): ask "
                f"its admin for a permission")
    return f"cannot reach the tracking store ({describe_error(e)})"


def check_joinable(spec: StudySpec, storage_url: str, tracking_uri: str) -> None:
    """Every store a worker joining a launched study needs, checked before it trains."""
    open_study(spec, storage_url, create=False)
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
        raise StoreError(f"--tracking-uri {safe_url(tracking_uri)}: no such MLflow store; use the tracking "
                         f"URI the study was launched with")
    check_tracking(tracking_uri)
