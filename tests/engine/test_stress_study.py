"""Stress studies end to end on real stores, and a study resumed after an upgrade that added
TrainConfig fields (nothing re-run)."""

from __future__ import annotations

import hashlib
import json

import pytest

from ablations.engine import trial as trial_module
from ablations.results import analysis, report
from ablations.design import designs
from ablations.design.spec import load_spec

pytestmark = pytest.mark.usefixtures("workers_one_thread")
STRESS = """\
design: one_at_a_time
factors:
  input_norm: [off, on]
  no_clamp: [off, on]
stress:
  lr: [1e-3, 30]
  precision: [fp32, fp16]
seeds: 1
"""


@pytest.fixture(scope="module")
def stress_study(tiny_study, make_stores, tmp_path_factory):
    d = tmp_path_factory.mktemp("stress")
    st = make_stores(d)
    spec = load_spec(tiny_study(d, "stress", STRESS, "features: power, feature_scale: 100"))
    res, out = st.launch(spec)
    rep = report.write_report(spec.name, st.tracking, d / "report",
                              analysis.plan_cells(str(spec.source)))
    return st, spec, res, out, rep, d / "report"


@pytest.mark.slow  # 16 runs, half of them fp16 (slow on CPUs without fp16 kernels): ~40 s
def test_stress_factors_are_crossed_and_tagged(stress_study):
    st, spec, res, out, rep, _ = stress_study
    n_cells = len(designs.one_at_a_time(spec.design_factors))
    assert res.total == n_cells * 2 * 2 and res.done == res.total
    assert "x stress lr, precision" in out
    exp = st.client.get_experiment_by_name(spec.name)
    assert exp.tags["study.stress"] == "lr,precision"
    assert set(rep.runs["precision"]) == {"fp32", "fp16"} and set(rep.runs["lr"]) == {1e-3, 30.0}


@pytest.mark.slow
def test_report_has_the_stability_section(stress_study):
    _, _, _, _, rep, out_dir = stress_study
    md = (out_dir / "report.md").read_text()
    for heading in ("## Stability under stress", "The edge (lr) and LR sensitivity per recipe",
                    "Each fix's effect on stability, per background and regime",
                    "Divergence and collapse per rung",
                    "Where runs first went non-finite, per regime"):
        assert heading in md
    assert {"loss_vs_lr", "stability_map"} <= set(rep.figures)
    assert (out_dir / "loss_vs_lr.png").stat().st_size > 10_000
    # power features under fp16 without input_norm overflow in the first convolution
    broken16 = rep.runs[(rep.runs.roles.str.contains("broken")) & (rep.runs.precision == "fp16")]
    assert (broken16.status == "diverged").all()
    assert set(broken16.first_nonfinite_where) == {"stem.conv:forward"}
    assert not rep.stability_effects.empty
    assert any("stability:" in line for line in report.verdict_lines(rep))


def _key_before_upgrade(cfg) -> str:
    """What a version without the stress fields computed: the hash of every field it knew."""
    new = {"precision", "features", "feature_scale", "adam_eps", "warmup_steps", "lr_schedule",
           "weight_decay_mode", "adam_beta2"}
    d = {k: v for k, v in cfg.to_dict().items() if k not in new}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()[:12]


def test_a_study_finished_before_fields_were_added_resumes_with_nothing_rerun(tiny_study, counting_train, 
        stores, monkeypatch):
    spec = load_spec(tiny_study(stores.dir, "upgrade", """\
design: full_factorial
factors:
  plain_residual: [off, on]
seeds: 2
"""))
    with monkeypatch.context() as mp:
        mp.setattr(designs, "config_key", _key_before_upgrade)
        first, _ = stores.launch(spec)
    assert first.done == 4
    counting = counting_train()
    monkeypatch.setattr(trial_module, "train", counting)
    second, out = stores.launch(spec)
    assert second.done == 4 and counting.calls == []
    assert "(4 done" in out


@pytest.mark.slow
def test_stability_notebook_executes(stress_study, monkeypatch):
    """notebooks/stability.ipynb runs top to bottom against a real stress study (no outputs
    committed)."""
    from pathlib import Path

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    st, spec, *_ = stress_study
    path = Path(__file__).resolve().parents[2] / "notebooks" / "stability.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("CHORUS_STUDY", spec.name)
    monkeypatch.setenv("CHORUS_TRACKING_URI", st.tracking)
    monkeypatch.setenv("CHORUS_STUDY_FILE", "")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(st.dir)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "axis: lr" in text
