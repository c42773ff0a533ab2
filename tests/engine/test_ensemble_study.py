"""`--ensemble`: a worker claims the seeds of a cell together and trains them as one vectorised
ensemble (model/ensemble.py), each with its own trial and MLflow run. End to end on real Optuna
and MLflow SQLite stores: the same study with and without the ensemble gives the same runs."""

import json
import math

import pytest
from optuna.trial import TrialState

import model.ensemble
from ablations.engine import trial as trial_module
from ablations.design.spec import load_spec
from ablations.engine.worker import WorkerContext
from model.config import TrainConfig

pytestmark = pytest.mark.usefixtures("workers_one_thread")
OUTCOMES = ("final_train_loss", "final_val_loss", "final_val_f1", "max_grad_norm", "init_loss")


class Groups:
    """Wraps model.ensemble.train_ensemble: records each group's size, can raise instead."""

    def __init__(self, raise_first=None):
        self.sizes: list[int] = []
        self.real = model.ensemble.train_ensemble
        self.raise_first = raise_first

    def __call__(self, cfgs, *args, **kwargs):
        self.sizes.append(len(cfgs))
        if self.raise_first is not None and len(self.sizes) == 1:
            raise self.raise_first
        return self.real(cfgs, *args, **kwargs)


def complete_by_key(stores, spec) -> dict:
    out = {}
    for t in stores.trials(spec):
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["run_key"] not in out, "a run completed twice"
            out[t.user_attrs["run_key"]] = t
    return out


@pytest.fixture
def two_stores(make_stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return make_stores(tmp_path / "a"), make_stores(tmp_path / "b")


def test_an_ensemble_study_equals_the_same_study_run_by_run(tiny_study, two_stores, monkeypatch, tmp_path):
    together, apart = two_stores
    spec = load_spec(tiny_study(tmp_path, "ens"))
    groups = Groups()
    monkeypatch.setattr(model.ensemble, "train_ensemble", groups)
    res_on, _ = together.launch(spec, ensemble="on")
    assert groups.sizes == [2, 2, 2, 2]  # each cell's two seeds, together
    res_off, _ = apart.launch(spec, ensemble="off")
    assert groups.sizes == [2, 2, 2, 2]  # (not called again)
    assert (res_on.done, res_off.done) == (8, 8)
    on, off = complete_by_key(together, spec), complete_by_key(apart, spec)
    assert set(on) == set(off) and len(on) == 8
    for key, t in on.items():
        u = off[key]
        assert t.user_attrs["status"] == u.user_attrs["status"], t.user_attrs["cell"]
        assert t.user_attrs["seed"] == u.user_attrs["seed"]
        for name in OUTCOMES:
            a, b = t.user_attrs[f"outcome.{name}"], u.user_attrs[f"outcome.{name}"]
            assert math.isnan(a) == math.isnan(b)
            if not math.isnan(a):  # model/ensemble.py: a different convolution kernel, 1e-3
                assert a == pytest.approx(b, rel=1e-3, abs=1e-6), (t.user_attrs["cell"], name)
    # one MLflow run per run, each with its own curve, FINISHED, named by its trial
    runs = together.runs(spec, "run")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags["ensemble"] for r in runs) == ["0,1"] * 8  # seeds trained together
    assert not any("ensemble" in r.data.tags for r in apart.runs(spec, "run"))
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in on.values()}
    steps = [len(together.client.get_metric_history(r.info.run_id, "train/loss")) for r in runs]
    assert steps == [6] * 8


def test_an_interrupted_ensemble_requeues_every_member_and_resumes(tiny_study, two_stores, monkeypatch,
                                                                   tmp_path):
    stores, _ = two_stores
    spec = load_spec(tiny_study(tmp_path, "ens_int"))
    monkeypatch.setattr(model.ensemble, "train_ensemble", Groups(raise_first=KeyboardInterrupt()))
    res, _ = stores.launch(spec, ensemble="on")
    assert res.interrupted
    failed = [t for t in stores.trials(spec) if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all(t.user_attrs["interrupted"] for t in failed)
    assert len({t.user_attrs["cell_id"] for t in failed}) == 1  # the two seeds of one cell
    killed = [r for r in stores.runs(spec, "run") if r.info.status == "KILLED"]
    assert len(killed) == 2
    assert not [t for t in stores.trials(spec) if t.state == TrialState.RUNNING]
    monkeypatch.setattr(model.ensemble, "train_ensemble", Groups())
    res, _ = stores.launch(spec, ensemble="on")
    assert res.done == 8 and len(complete_by_key(stores, spec)) == 8


def test_a_crashed_ensemble_uses_one_retry_of_each_member(tiny_study, two_stores, monkeypatch, tmp_path):
    stores, _ = two_stores
    spec = load_spec(tiny_study(tmp_path, "ens_crash", "retries: 1\n"))
    groups = Groups(raise_first=RuntimeError("boom"))
    monkeypatch.setattr(model.ensemble, "train_ensemble", groups)
    res, _ = stores.launch(spec, ensemble="on")
    assert res.done == 8  # the two crashed runs re-queued and then run
    crashed = [t for t in stores.trials(spec) if t.state == TrialState.FAIL]
    assert len(crashed) == 2 and not any(t.user_attrs["interrupted"] for t in crashed)
    assert all("RuntimeError: boom" in t.user_attrs["error"] for t in crashed)
    retried = {t.user_attrs["run_key"]: t.user_attrs["attempt"]
               for t in complete_by_key(stores, spec).values()}
    assert sorted(retried.values()) == [1] * 6 + [2] * 2
    assert [r.info.status for r in stores.runs(spec, "run")].count("FAILED") == 2


class FakeTrial:
    def __init__(self, config: dict):
        self.user_attrs = {"config": json.dumps(config)}


@pytest.mark.parametrize("mode,device,precision,size", [
    ("off", None, "fp32", 1),
    ("auto", None, "fp32", 1),  # CPU: the model is compute-bound, an ensemble does not pay
    ("on", None, "fp32", 3),
    ("on", None, "fp16", 1),  # not vectorised (GradScaler): trained one at a time
])
def test_ensemble_size(tiny_study, tmp_path, mode, device, precision, size):
    spec = load_spec(tiny_study(tmp_path, "sz", "design: full_factorial\nfactors:\n"
                                 "  bias_init: [off, on]\nseeds: 3\n"))
    ctx = WorkerContext(spec, "sqlite://", "sqlite://", None, device=device, ensemble=mode)
    cfg = TrainConfig(precision=precision, device="cpu")
    assert trial_module.ensemble_size(ctx, FakeTrial(cfg.to_dict())) == size
