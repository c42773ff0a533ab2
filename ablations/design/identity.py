"""A run's identity in one encoding: how a run is named in the queue (an Optuna trial's params and
user attributes) and on its MLflow run (tags), and how both are read back, typed.

  run_key      the run's stable key (designs.config_key of its resolved config)
  cell         readable label, `bias_init=on lr=0.001`: run names, summaries, and the analysis's
               matching of runs to the study file's plan
  cell_values  the same values typed, as JSON (`{"bias_init": true, "lr": 0.001}`): what a
               worker rebuilds the cell from and the analysis reads its factor columns from
  cell_id, roles, seed
  config       (queue only) the resolved TrainConfig as JSON: what the worker trains

A queued trial's params are its factors' labels (optuna-dashboard's axes); the seed is a user
attribute, not a param: it is no hyperparameter.
"""

from __future__ import annotations

import json
import uuid
import warnings
from typing import Any, Mapping

from ablations.design.designs import Cell, PlannedRun
from ablations.design.fixes import FIXES
from ablations.design.spec import Factor, StudySpec
from model.config import HighLearningRateWarning, TrainConfig

# What names a run among a trial's user attributes: a re-queued run copies them
IDENTITY = ("run_key", "cell_id", "cell", "cell_values", "roles", "seed", "config")


def encode_values(cell: Cell) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cell.assignment})


def decode_values(text: str) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}


def identity(spec: StudySpec, cell: Cell, seed: int, run_key: str) -> dict[str, Any]:
    """What names a run (the seed an int): a trial's user attributes, and its run's MLflow tags
    as strings (`tags`)."""
    return {"run_key": run_key, "cell_id": cell.cell_id, "cell": cell.label(spec.factors),
            "cell_values": encode_values(cell), "roles": ",".join(cell.roles), "seed": seed}


def tags(spec: StudySpec, cell: Cell, seed: int, run_key: str) -> dict[str, str]:
    return {k: str(v) for k, v in identity(spec, cell, seed, run_key).items()}


def queue_entry(spec: StudySpec, run: PlannedRun, attempt: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run as an enqueued trial: its fixed params and its user attrs."""
    by_name = {f.name: f for f in spec.factors}
    params = {name: by_name[name].label(v) for name, v in run.cell.assignment}
    return params, {
        "enqueue_id": uuid.uuid4().hex,  # lets a retried enqueue find itself instead of doubling
        **identity(spec, run.cell, run.seed, run.run_key), "attempt": attempt,
        "config": json.dumps(run.config.to_dict())}


def requeue_entry(params: Mapping[str, Any], attrs: Mapping[str, Any],
                  attempt: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same run queued again (same params and identity, a new enqueue id)."""
    return dict(params), {**{k: attrs[k] for k in IDENTITY if k in attrs},
                          "enqueue_id": uuid.uuid4().hex, "attempt": attempt}


def claimed_run(spec: StudySpec, params: Mapping[str, Any], attrs: Mapping[str, Any]) -> PlannedRun:
    """The run a claimed trial names: its cell, seed and config, and the key it was queued
    under (never recomputed: the queue's key is the run's). A trial queued before `cell_values`
    existed has its values looked up from its params' labels."""
    if "cell_values" in attrs:
        values = decode_values(attrs["cell_values"])
    else:
        values = {f.name: _value_of(f, params[f.name]) for f in spec.factors}
    cell = Cell(tuple((f.name, values[f.name]) for f in spec.factors),
                tuple(r for r in attrs.get("roles", "").split(",") if r))
    run = PlannedRun(cell, attrs["seed"], claimed_config(attrs, spec))
    run.__dict__["run_key"] = attrs["run_key"]  # (PlannedRun.run_key is a cached property)
    return run


def claimed_config(attrs: Mapping[str, Any], spec: StudySpec | None = None) -> Any:
    """The resolved config a queued run trains (its `config` attribute), of the study's recipe."""
    cls = spec.config_class if spec is not None else TrainConfig
    with warnings.catch_warnings():  # (the warning was given when the study was planned)
        warnings.simplefilter("ignore", HighLearningRateWarning)
        return cls.from_overrides(json.loads(attrs["config"]))


def config_but_seed(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A queued run's config without its seed: equal for the seeds of one cell."""
    cfg = json.loads(attrs.get("config", "{}"))
    cfg.pop("seed", None)
    return cfg


def _value_of(factor: Factor, label: str) -> Any:
    for v in factor.values:
        if factor.label(v) == label:
            return v
    raise KeyError(label)


def values_of(tags: Mapping[str, str]) -> dict[str, Any]:
    """A run's factor values, typed, from its MLflow tags. A run logged before `cell_values`
    existed has only its label: its values are read as the label writes them (a fix's on/off as
    a bool, what reads as a number as a float, anything else as text)."""
    if tags.get("cell_values"):
        return decode_values(tags["cell_values"])
    out: dict[str, Any] = {}
    for part in tags.get("cell", "").split():
        k, _, v = part.partition("=")
        if k in FIXES and v in ("on", "off"):
            out[k] = v == "on"
            continue
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out
