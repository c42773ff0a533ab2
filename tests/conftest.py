"""Shared test setup: one torch thread (tiny tensors gain nothing from more, and on a busy
2-core machine extra threads spin against each other and slow tiny runs by 10-100x); the tiny
study every end-to-end test trains; real Optuna and MLflow stores in a temporary folder."""

from __future__ import annotations

import contextlib
import io
import shutil
import textwrap
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workers_one_thread():
    """work() sets torch's threads to cores // workers, overriding the one thread above; on a
    busy 2-core machine one thread is several times faster and far steadier for tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", lambda n: None)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ the tiny study
# The study every end-to-end test trains: a 2 x 2 full factorial of two fixes from the fixed
# recipe, 2 seeds (the README's main job before studies/quick.yaml became a stress ladder), and a
# model that trains 2 epochs x 3 steps on 4 short synthetic songs (a fraction of a second per
# run; the stores cost more).
TINY_MODEL = {"n_songs": 4, "frames": 128, "n_features": 8, "hidden_dim": 8, "n_blocks": 1,
              "epochs": 2, "steps_per_epoch": 3, "batch_size": 8, "device": "cpu"}
EPOCHS, STEPS_PER_EPOCH = TINY_MODEL["epochs"], TINY_MODEL["steps_per_epoch"]
TINY_STUDY = {"name": "", "design": "full_factorial",
              "factors": {"bias_init": [False, True], "plain_residual": [False, True]},
              "seeds": 2, "baseline": "fixed", "base": {},
              "objective": {"metric": "final_val_f1", "direction": "maximize"}}


def tiny_study_text(name: str, body: str = "", base_extra: str = "") -> str:
    """The study file: TINY_STUDY, then `body` (YAML: a test's own design, factors, seeds...)
    over it, and `base_extra` ("key: value, ..." over the tiny model)."""
    study = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_STUDY.items()}
    study.update(yaml.safe_load(textwrap.dedent(body)) or {})
    study["name"] = name
    study["base"] = {**TINY_MODEL, **(yaml.safe_load("{" + base_extra + "}") or {})}
    return yaml.safe_dump(study, sort_keys=False)


@pytest.fixture(scope="session")
def tiny_study() -> Callable[..., Path]:
    """tiny_study(folder, name, body="", base_extra="") writes folder/name.yaml, see
    tiny_study_text, and returns its path."""

    def write(folder: Path, name: str, body: str = "", base_extra: str = "") -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(tiny_study_text(name, body, base_extra))
        return path

    return write


# ------------------------------------------------------------------------------ the stores
class Stores:
    """An Optuna storage and an MLflow tracking store in one folder."""

    def __init__(self, d: Path, template: Path):
        self.dir = d
        shutil.copy(template, d / "mlflow.db")
        self.storage = f"sqlite:///{d}/optuna.db"
        self.tracking = f"sqlite:///{d}/mlflow.db"
        from mlflow.tracking import MlflowClient

        with contextlib.chdir(d):  # MLflow fixes a store's ./mlruns when it first opens it
            self.client = MlflowClient(self.tracking)
            self.client.search_experiments(max_results=1)

    def launch(self, spec, **kw):
        from ablations.engine.launch import launch

        out = io.StringIO()
        with contextlib.chdir(self.dir):  # MLflow's ./mlruns artifacts land here
            res = launch(spec, storage_url=self.storage, tracking_uri=self.tracking, out=out, **kw)
        return res, out.getvalue()

    def trials(self, spec) -> list:
        import optuna

        return optuna.load_study(study_name=spec.name, storage=self.storage).get_trials()

    def runs(self, spec, kind: str) -> list:
        exp = self.client.get_experiment_by_name(spec.name)
        return self.client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'",
                                       max_results=1000)

    def text(self, run_id: str, path: str) -> str:
        dst = self.dir / "downloads" / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst))).read_text()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database, made once and copied into each store (MLflow's schema
    migrations take ~5 s per fresh database)."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("mlflow_template")
    with contextlib.chdir(d):
        MlflowClient(f"sqlite:///{d}/mlflow.db").search_experiments(max_results=1)
    return d / "mlflow.db"


@pytest.fixture(scope="session")
def make_stores(mlflow_template) -> Callable[[Path], Stores]:
    """make_stores(folder): a fresh pair of stores there (for module-scoped fixtures)."""
    return lambda d: Stores(d, mlflow_template)


@pytest.fixture
def stores(tmp_path, monkeypatch, make_stores) -> Stores:
    monkeypatch.chdir(tmp_path)
    return make_stores(tmp_path)


class CountingTrain:
    """Stands in for ablations.engine.trial.train: counts calls, can fail chosen calls."""

    def __init__(self, fail: Optional[Callable] = None):
        self.calls: list = []
        self.fail = fail  # (call number, cfg) -> exception to raise, or None

    def __call__(self, cfg, *args, **kwargs):
        from model.train import train

        self.calls.append(cfg)
        exc = self.fail(len(self.calls), cfg) if self.fail else None
        if exc is not None:
            raise exc
        return train(cfg, *args, **kwargs)


@pytest.fixture(scope="session")
def counting_train() -> type[CountingTrain]:
    """counting_train(fail=...): a CountingTrain to monkeypatch in for trial.train."""
    return CountingTrain
