"""ablations/design/identity.py: a run is named one way in the queue and on MLflow, and read back typed."""

from __future__ import annotations

import pytest

from ablations.design import designs, identity
from ablations.design.spec import parse_spec
from ablations.tracking.tracker import run_tags


@pytest.fixture(scope="module")
def spec():
    # a fix (bool), a float, an int, a text and a tuple-valued field
    return parse_spec({"name": "ids", "design": "one_at_a_time",
                       "factors": {"bias_init": ["off", "on"], "lr": [1e-4, 3e-4],
                                   "hidden_dim": [8, 16], "norm": ["batch", "layer"],
                                   "chorus_labels": [["chorus"], ["chorus", "altchorus"]]},
                       "seeds": [0, 1], "base": {"n_songs": 4, "device": "cpu"}}, "<test>")


def test_a_queued_run_is_claimed_back_as_the_same_run_with_typed_values(spec):
    for run in designs.runs(spec):
        params, attrs = identity.queue_entry(spec, run, attempt=1)
        back = identity.claimed_run(spec, params, attrs)
        assert back.cell == run.cell and back.seed == run.seed and back.config == run.config
        assert back.run_key == run.run_key
        for (_, v), (_, w) in zip(back.cell.assignment, run.cell.assignment):
            assert type(v) is type(w)  # 8 stays an int, True a bool, a tuple a tuple
    assert any(run.cell.roles for run in designs.runs(spec))  # roles travel too


def test_a_run_queued_before_cell_values_existed_is_read_from_its_labels(spec):
    run = designs.runs(spec)[5]
    params, attrs = identity.queue_entry(spec, run, attempt=1)
    del attrs["cell_values"]
    assert identity.claimed_run(spec, params, attrs).cell == run.cell


def test_a_requeue_keeps_the_identity_and_counts_the_attempt_given(spec):
    run = designs.runs(spec)[2]
    params, attrs = identity.queue_entry(spec, run, attempt=2)
    attrs.update(status="crashed", error="boom", mlflow_run_id="x")  # what an attempt adds
    again_params, again = identity.requeue_entry(params, attrs, attempt=3)
    assert again_params == params and again["attempt"] == 3
    assert again["enqueue_id"] != attrs["enqueue_id"]
    assert {k: again[k] for k in identity.IDENTITY} == {k: attrs[k] for k in identity.IDENTITY}
    assert not {"status", "error", "mlflow_run_id"} & set(again)


def test_mlflow_tags_carry_the_same_identity_and_read_back_typed(spec):
    run = designs.runs(spec)[3]
    tags = run_tags(spec, run.cell, run.seed, run.run_key, 7, "host:1", 1)
    _, attrs = identity.queue_entry(spec, run, attempt=1)
    for k in ("run_key", "cell_id", "cell", "cell_values", "seed"):
        assert tags[k] == str(attrs[k])
    assert identity.values_of(tags) == run.cell.values()
    assert isinstance(identity.values_of(tags)["hidden_dim"], int)


def test_a_run_logged_before_cell_values_existed_is_read_from_its_label():
    old = {"cell": "bias_init=on lr=0.0003 hidden_dim=8 norm=batch"}
    assert identity.values_of(old) == {"bias_init": True, "lr": 0.0003, "hidden_dim": 8.0,
                                       "norm": "batch"}
