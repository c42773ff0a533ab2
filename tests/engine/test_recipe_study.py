"""A study of the second shipped recipe, chorus_transformer, end to end on real stores: its
fixes as factors, an lr ladder, its curve (the largest attention logit) logged per step and
summarised, and the report judging its claims, not the chorus CNN's."""

from __future__ import annotations

import pytest

from ablations.design.spec import load_spec
from ablations.results import analysis, report

pytestmark = pytest.mark.usefixtures("workers_one_thread")
STUDY = """\
name: tiny_transformer
recipe: chorus_transformer
design: full_factorial
factors:
  qk_layernorm: [off, on]
  z_loss: [off, on]
stress:
  lr: [1e-3, 3]
seeds: 2
base: {n_songs: 4, frames: 32, n_features: 8, d_model: 16, n_heads: 2, n_layers: 1,
       epochs: 2, steps_per_epoch: 3, batch_size: 4, warmup_steps: 2, device: cpu}
"""


@pytest.fixture(scope="module")
def study(make_stores, tmp_path_factory):
    d = tmp_path_factory.mktemp("transformer")
    st = make_stores(d)
    (d / "tiny_transformer.yaml").write_text(STUDY)
    spec = load_spec(d / "tiny_transformer.yaml")
    res, out = st.launch(spec)
    rep = report.write_report(spec.name, st.tracking, d / "report",
                              analysis.plan_cells(str(spec.source)), recipe=spec.recipe)
    return st, spec, res, out, rep, d / "report"


def test_the_study_file_names_the_recipe():
    from ablations.design import designs
    from model.chorus_transformer import TransformerConfig
    from ablations.design.spec import parse_spec
    import yaml

    spec = parse_spec(yaml.safe_load(STUDY))
    assert spec.recipe.name == "chorus_transformer"
    runs = designs.runs(spec)
    assert len(runs) == 16 and all(type(r.config) is TransformerConfig for r in runs)
    off = [r.config for r in runs if r.cell.values()["qk_layernorm"] is False]
    assert {c.qk_layernorm for c in off} == {False} and {c.d_model for c in off} == {16}


@pytest.mark.slow  # 16 tiny Transformer runs and the report: ~30 s on a busy 2-core machine
def test_a_transformer_study_runs_logs_its_curve_and_is_reported(study):
    st, spec, res, out, rep, out_dir = study
    assert res.total == res.done == 16
    runs = st.runs(spec, "run")
    assert {r.data.tags["recipe"] for r in runs} == {"chorus_transformer"}
    assert {r.data.tags["fix.qk_layernorm"] for r in runs} == {"on", "off"}
    r = runs[0]
    assert "train/attn_logit" in r.data.metrics and "outcome.peak_attn_logit" in r.data.metrics
    assert r.data.params["d_model"] == "16"
    history = st.client.get_metric_history(r.info.run_id, "train/attn_logit")
    assert len(history) == r.data.metrics["outcome.steps"] > 0
    # the report judges the Transformer's claims with its curve among the stability outcomes
    assert set(rep.verdicts.fix) <= {"qk_layernorm", "z_loss"} and len(rep.verdicts)
    eff = rep.stability_effects
    assert "peak_attn_logit" in set(eff.outcome)
    assert set(eff[eff.outcome == "peak_attn_logit"].fix) == {"qk_layernorm", "z_loss"}
    md = (out_dir / "report.md").read_text()
    assert "peak_attn_logit" in md and "bias_init" not in md
    assert "curves" in rep.figures


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["ablation_report.ipynb", "curves.ipynb", "stability.ipynb"])
def test_the_notebooks_read_a_transformer_study(study, notebook, monkeypatch):
    """The committed notebooks run top to bottom on the second recipe's study too; the report
    they build judges its fixes (the recipe is read back from the experiment's tags)."""
    from pathlib import Path

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    st, spec, *_ = study
    nb = nbformat.read(Path(__file__).resolve().parents[2] / "notebooks" / notebook, as_version=4)
    monkeypatch.setenv("CHORUS_STUDY", spec.name)
    monkeypatch.setenv("CHORUS_TRACKING_URI", st.tracking)
    monkeypatch.setenv("CHORUS_STUDY_FILE", str(spec.source))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(st.dir)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    if notebook == "ablation_report.ipynb":
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                       for c in nb.cells for o in c.get("outputs", []))
        assert "qk_layernorm" in text


def test_the_recipe_is_read_back_from_the_experiment_tags(tmp_path):
    from ablations.results.analysis import study_recipe

    assert study_recipe({}) is None  # a study from before recipes: the chorus CNN's fixes
    assert study_recipe({"study.recipe": "chorus_transformer"}).name == "chorus_transformer"
    assert study_recipe({"study.recipe": "gone.py:RECIPE",
                         "study.source": str(tmp_path / "s.yaml")}) is None
