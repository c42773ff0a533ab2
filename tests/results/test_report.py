"""The report and the notebooks on a tiny real study (real Optuna and MLflow stores in tmp)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablations.results import analysis, report
from ablations.design.spec import load_spec
from ablations.tracking.tracker import attach_report

ROOT = Path(__file__).resolve().parents[2]
FACTORS = "factors: {plain_residual: [off, on], clip_0_5: [off, on]}\n"  # 2 x 2 x 2 seeds
EPOCHS, STEPS_PER_EPOCH = 2, 3  # the tiny study's (tests/conftest.py)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, make_stores, tiny_study):
    """The tiny study with two fixes as factors, launched: (its folder, its tracking URI); the
    study file is tinyrep.yaml there."""
    tmp = tmp_path_factory.mktemp("report")
    stores = make_stores(tmp)
    res, _ = stores.launch(load_spec(tiny_study(tmp, "tinyrep", FACTORS)))
    assert res.done == 8
    return tmp, stores.tracking


def test_load_runs_and_curves(launched):
    """One row per run with factors as booleans; curves in long format with every step."""
    tmp, uri = launched
    runs = analysis.load_runs("tinyrep", uri)
    assert len(runs) == 8 and set(runs["seed"]) == {0, 1}
    assert runs["plain_residual"].dtype == bool
    assert analysis.factor_names(runs) == ["plain_residual", "clip_0_5"]
    curves = analysis.load_curves("tinyrep", ["train/loss"], uri, runs)
    assert len(curves) == 8 * EPOCHS * STEPS_PER_EPOCH
    assert set(curves["metric"]) == {"train/loss"}


def test_report_writes_figures_markdown_and_logs_to_parent(launched):
    """runner's report: every figure as a PNG, a Markdown file with verdicts, logged to MLflow."""
    tmp, uri = launched
    out = tmp / "rep"
    rep = report.write_report("tinyrep", uri, out)
    went = (rep.runs["first_nonfinite_step"] < rep.runs["steps"]).any()
    for name in ("curves", "effects", "half_normal", "divergence_heatmap", "ablation_path") + (
            ("first_nonfinite",) if went else ()):
        png = rep.figures[name]
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = rep.markdown.read_text()
    assert "## Verdicts on the seed's claims" in md and "plain_residual" in md
    assert set(rep.verdicts["verdict"]) <= {"supported", "refuted", "inconclusive", "untested"}
    # issue #13: the design's model, its convention and the verdict rule are in the report
    assert rep.design == "full_factorial" and "final_val_f1" in rep.fits
    assert "Effect = 2 x coefficient" in md and "Rule applied:" in md and "Holm" in md
    assert "## Rate differences" in md and "Newcombe" in md
    fit = rep.fits["final_val_f1"]
    assert fit.n == 8 and fit.df_resid == 4 and set(fit.table.term) == {
        "plain_residual", "clip_0_5", "plain_residual:clip_0_5"}
    if not went:  # no empty figure: the report says why there is none
        assert "first_nonfinite" not in rep.figures and not (out / "first_nonfinite.png").exists()
        assert "No run went non-finite (8 runs): no figure." in md
    parent = attach_report(uri, "tinyrep", str(out), *report.run_summary(rep))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/curves.png"} <= names
    # the launch run's description: the verdicts first, then a link to report.md in the UI
    run = client.get_run(parent)
    exp_id = run.info.experiment_id
    note = run.data.tags["mlflow.note.content"]
    link_line, head = note.split("\n\n")[:2]  # what the run page shows before "Show more"
    assert link_line.startswith("**Full report:** [report/report.html](")
    assert head.startswith("**Verdicts** (8 counted runs): ")
    for fix, verdict in zip(rep.verdicts["fix"], rep.verdicts["verdict"]):
        assert f"{fix} **{verdict}**" in head
    link = f"#/experiments/{exp_id}/runs/{parent}/artifacts/report/report.html"
    assert f"]({link}?workflowType=machine_learning)" in note
    assert "8/8 runs done" in note  # the launch's own summary is kept below
    # CIs stay text: an unescaped `[95% CI ..] (context)` is a link to /context in the UI
    assert "[95% CI" not in note.replace("\\[95% CI", "") and "\\[95% CI" in note
    for r in client.search_runs([exp_id], "tags.kind = 'run'"):  # each run leads back
        back = r.data.tags["mlflow.note.content"].split("\n\n")[0]
        assert back.startswith("**Back to:** [study runs](") and f"]({link}?" in back, back
        assert f"tags.cell_id%20%3D%20%27{r.data.tags['cell_id']}%27" in back, back
    exp_note = client.get_experiment(exp_id).tags["mlflow.note.content"]
    assert link in exp_note  # and one click from the runs page
    attach_report(uri, "tinyrep", str(out), *report.run_summary(rep))  # again: the summary is not lost or doubled
    assert client.get_run(parent).data.tags["mlflow.note.content"] == note


def test_html_report_embeds_every_figure_and_leaves_no_markdown(launched):
    """report.html: one file, each figure of the report inlined, the effects figure right under
    the verdicts, no Markdown syntax left over (MLflow shows it as-is)."""
    import re

    tmp, uri = launched
    rep = report.write_report("tinyrep", uri, tmp / "rep-html")
    page = rep.html.read_text()
    embedded = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,', page)
    assert sorted(embedded) == sorted(rep.figures), (embedded, list(rep.figures))
    assert "src=\"" + "curves.png" not in page  # no relative image: it would break in MLflow
    text = re.sub(r"<[^>]+>", "", re.sub(r'src="data:[^"]+"', "", page))
    for leftover in ("**", "![", "](", "\n#", "|---"):
        assert leftover not in text, leftover
    assert page.index('id="verdicts-on-the-seed-s-claims"') < page.index('id="fig-effects"') < \
        page.index('id="how-effects-are-estimated"')
    assert "<table>" in page and "<code>" in page


def test_a_moved_study_folder_still_opens_its_artifacts(launched, tmp_path):
    """A finished study's folder (mlflow.db + mlruns/) moved elsewhere, the original gone:
    before relocation a run's artifacts are lost, after it (what `runner.py ui` does first) they
    open from the new place; a second pass changes nothing."""
    import shutil

    from mlflow.tracking import MlflowClient

    from ablations.tracking.relocate import relocate

    src, _ = launched
    moved = tmp_path / "elsewhere" / "study"
    shutil.copytree(src, moved, ignore=shutil.ignore_patterns("rep*"))
    hidden = src.with_name(src.name + "-gone")
    src.rename(hidden)  # the original is gone (put back below for the other tests)
    try:
        client = MlflowClient(f"sqlite:///{moved}/mlflow.db")
        exp = client.get_experiment_by_name("tinyrep")
        run = client.search_runs([exp.experiment_id], "tags.kind = 'run'", max_results=1)[0]
        assert str(src) in run.info.artifact_uri  # the old machine's path
        with pytest.raises(Exception):
            client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))
        changes = relocate(str(moved / "mlflow.db"))
        assert [c[0] for c in changes] == [exp.experiment_id]
        run = client.get_run(run.info.run_id)
        assert run.info.artifact_uri.startswith(str(moved / "mlruns")), run.info.artifact_uri
        assert client.get_experiment(exp.experiment_id).artifact_location.startswith(str(moved))
        got = client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))
        assert '"status"' in Path(got).read_text()
        assert relocate(str(moved / "mlflow.db")) == []  # already inside its folder
    finally:
        hidden.rename(src)


def test_runner_report_cli(launched):
    """`runner.py report` prints the verdicts and writes the report (exit 0)."""
    tmp, uri = launched
    spec = tmp / "tinyrep.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "runner.py"), "report", str(spec),
                           "--tracking-uri", uri, "--out", str(tmp / "cli_rep")],
                          capture_output=True, text=True, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "verdicts (8 runs)" in proc.stdout and (tmp / "cli_rep" / "report.md").exists()


@pytest.mark.parametrize("notebook", ["ablation_report.ipynb", "curves.ipynb"])
def test_notebooks_execute(launched, notebook, monkeypatch):
    """The committed notebooks run top to bottom against a real study (and have no outputs)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    tmp, uri = launched
    path = ROOT / "notebooks" / notebook
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed with outputs"
    monkeypatch.setenv("CHORUS_STUDY", "tinyrep")
    monkeypatch.setenv("CHORUS_TRACKING_URI", uri)
    monkeypatch.setenv("CHORUS_STUDY_FILE", "")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_runner_plan_reads_the_store(launched):
    """`runner.py plan`: design and model df, wall time from the runs in the store, power from
    their seed-to-seed spread, seeds for a target effect; trains nothing."""
    tmp, uri = launched
    proc = subprocess.run([sys.executable, str(ROOT / "runner.py"), "plan", str(tmp / "tinyrep.yaml"),
                           "--tracking-uri", uri, "--target-effect", "0.05"],
                          capture_output=True, text=True, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4 cells x 2 seeds = 8 runs" in out and "4 residual df" in out
    assert "wall time: about" in out and "median of 8 recent runs" in out
    assert "pooled over 4 recipe(s) of this plan already in the store (8 runs, 4 df)" in out
    assert "smallest F1 effect:" in out and "seeds for an F1 effect of 0.05:" in out


def test_plan_without_a_store_and_without_torch_or_mlflow(tmp_path, tiny_study):
    """No store: 'none known' and the stated default spread; the planning code imports neither
    torch nor MLflow (and creates no database); a bad option is a one-line error."""
    study = tiny_study(tmp_path, "tinyrep", FACTORS)
    code = ("import sys; from ablations.results.power import plan; from ablations.design.spec import load_spec; "
            f"print('\\n'.join(plan(load_spec({str(study)!r}), "
            "'sqlite:///mlflow.db'))); "
            "print('torch' in sys.modules, 'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "wall time: none known (no tracking store at mlflow.db)" in proc.stdout
    assert "0.03: an assumed default" in proc.stdout
    # the rate test the analysis runs: each fix's on/off runs pair up, 8 runs -> 4 pairs
    assert "exact power of the paired Newcombe score test the analysis runs: 4 pairs" in proc.stdout
    assert proc.stdout.strip().endswith("False False")
    assert not (tmp_path / "mlflow.db").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "runner.py"), "plan", str(study),
                          "--sd", "-1"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--sd -1: must be a positive number" in bad.stderr
