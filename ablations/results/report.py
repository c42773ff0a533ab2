"""The study report: figures (PNG) and a Markdown file with verdicts and effects.

    python runner.py report studies/quick.yaml  # -> reports/quick/report.md, report.html, *.png

Every figure reads from `ablations.results.analysis` only; the tracker attaches the report to the
study's latest launch run in MLflow under `report/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd

from ablations.design.fixes import FIXES, Fix
from ablations.results import analysis, backgrounds, effects as fx, rates, stability
from ablations.results.figures import (CURVE_METRICS, fig_curves,  # noqa: F401 (also report.fig_*)
                                       fig_divergence_heatmap, fig_effects, fig_first_nonfinite,
                                       fig_half_normal, fig_path)
from ablations.results.fragility import runs_text
from ablations.results.verdicts import RULE
from model.recipe import Recipe


@dataclass
class Report:
    study: str
    runs: pd.DataFrame
    factors: list[str]
    effects: pd.DataFrame
    verdicts: pd.DataFrame
    interactions: pd.DataFrame
    one_at_a_time: pd.DataFrame
    path: pd.DataFrame
    stress: list[str] = field(default_factory=list)
    stability_effects: pd.DataFrame = field(default_factory=pd.DataFrame)
    crashed: pd.DataFrame = field(default_factory=pd.DataFrame)  # runs crashed past retries
    rate_tests: pd.DataFrame = field(default_factory=pd.DataFrame)  # one-at-a-time, per background
    figures: dict[str, Path] = field(default_factory=dict)
    markdown: Optional[Path] = None
    html: Optional[Path] = None
    design: str = ""
    fits: dict[str, fx.FactorialFit] = field(default_factory=dict)  # factorial designs
    aliases: Optional[fx.Aliases] = None
    importance: pd.DataFrame = field(default_factory=pd.DataFrame)  # search designs
    associations: pd.DataFrame = field(default_factory=pd.DataFrame)


def infer_design(runs: pd.DataFrame, factors: list[str]) -> str:
    """The design of a runs table with no recorded design (older experiments, synthetic tables)."""
    if runs["roles"].astype(str).str.len().gt(0).any():
        return "one_at_a_time"
    two = fx.two_level(runs, factors)
    if two != factors or not factors:
        return "search"
    cells = runs[factors].drop_duplicates()
    if len(cells) == 2 ** len(factors):
        return "full_factorial"
    k = len(cells).bit_length() - 1
    return "fractional_factorial" if len(cells) == 2 ** k and k < len(factors) else "search"


def analyse(study: str, tracking_uri: Optional[str], plan=None, design: str = "",
            factors: Optional[list[str]] = None,
            fixes: Optional[Mapping[str, Fix]] = None) -> Report:
    """Effects, verdicts and tables for the study's design.

    Factorial designs: the design's OLS model (ablations.results.effects) for continuous outcomes and
    score intervals for rates; one-at-a-time: paired bootstrap (analysis.main_effects) and paired
    score intervals; search: importance and associations only, no verdicts. `factors`: the factors
    to analyse (default: every factor in the cell labels)."""
    runs = analysis.load_runs(study, tracking_uri, plan=plan)
    if runs.empty:
        raise LookupError(f"study {study!r} has no finished runs in {tracking_uri}")
    factors = factors or analysis.factor_names(runs)
    tags = analysis.experiment_tags(study, tracking_uri)
    if fixes is None:  # the claims judged are the fixes of the recipe the study ran
        recipe = analysis.study_recipe(tags)
        fixes = recipe.fix_map if recipe is not None else FIXES
    design = design or tags.get("study.design") or infer_design(runs, factors)
    stress = [s for s in tags.get("study.stress", "").split(",") if s]
    empty = pd.DataFrame()
    if design == "search":
        from ablations.results import importance

        return Report(study, runs, factors, empty, empty, empty, empty, empty, design=design,
                      importance=importance.importance(runs, factors),
                      associations=importance.associations(runs, factors))
    fits, aliases = {}, None
    rate_tests = pd.DataFrame()
    in_runs = [x for x in stress if x in runs]
    lay = stability.layout(runs, factors, in_runs) if in_runs else None
    crashed = analysis.load_crashed(study, tracking_uri, runs, plan) if in_runs else pd.DataFrame()
    stab = (stability.fix_effects(runs, lay, crashed if len(crashed) else None)
            if lay is not None and lay.has_axis else pd.DataFrame())
    if design in ("full_factorial", "fractional_factorial") and fx.two_level(runs, factors) == factors:
        de = fx.factorial_effects(runs, factors, tags.get("mlflow.note.content", ""))
        effects, inter, fits, aliases = de.effects, de.interactions, de.fits, de.aliases
        oat = pd.DataFrame()
    elif backgrounds.has_roles(runs):  # one at a time: each fix in each background, never pooled
        design_f = [f for f in factors if f not in in_runs]
        axis = lay.axis if lay is not None else None
        cont = pd.concat([backgrounds.continuous(runs, design_f, in_runs, o, axis)
                          for o in fx.CONTINUOUS], ignore_index=True)
        rate_tests = backgrounds.rate_tests(runs, design_f, in_runs, axis=axis)
        effects = backgrounds.as_effects(pd.concat([cont, rate_tests], ignore_index=True))
        inter = pd.DataFrame()
        oat = backgrounds.public(cont[cont.outcome == "final_val_f1"])
    else:  # factors with more than two levels: paired where partners exist
        effects = pd.concat([analysis.main_effects(runs, factors, fx.CONTINUOUS),
                             rates.rate_table(runs, factors)], ignore_index=True)
        inter = analysis.interactions(runs, factors)
        oat = pd.DataFrame()
    claims = analysis.claim_estimates(runs, factors, in_runs, stab, fixes)
    return Report(study, runs, factors, effects, analysis.verdicts(effects, runs, claims, fixes),
                  inter, oat, analysis.ablation_path(runs, factors), design=design, fits=fits,
                  aliases=aliases, stress=stress, stability_effects=stab, crashed=crashed,
                  rate_tests=backgrounds.public(rate_tests))


def write_report(study: str, tracking_uri: Optional[str], out_dir: Path, plan=None,
                 design: str = "", objective: str = "final_val_f1",
                 recipe: Optional[Recipe] = None) -> Report:
    """Analyse the study, draw the figures, write report.md into out_dir. `recipe`: the study's
    (its fixes are the claims judged, its curves drawn); default the chorus CNN."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe or analysis.study_recipe(analysis.experiment_tags(study, tracking_uri))
    fixes = recipe.fix_map if recipe is not None else FIXES
    rep = analyse(study, tracking_uri, plan, design, fixes=fixes)
    runs = rep.runs
    metrics = CURVE_METRICS + [(f"train/{name}", name.replace("_", " "), True)
                               for name in (recipe.curves if recipe is not None else {})]
    curves = analysis.load_curves(study, [m for m, _, _ in metrics], tracking_uri, runs)
    search = rep.design == "search"
    figures = {"curves": fig_curves(curves, runs, rep.factors, out_dir, metrics),
               "effects": fig_effects(rep.effects, out_dir),
               "half_normal": (fig_half_normal(rep.fits["final_val_f1"], out_dir)
                               if "final_val_f1" in rep.fits else None),
               "divergence_heatmap": fig_divergence_heatmap(runs, rep.factors, out_dir, fixes),
               "first_nonfinite": fig_first_nonfinite(runs, out_dir),
               "ablation_path": None if search else fig_path(rep.path, out_dir, objective)}
    rep.figures = {k: v for k, v in figures.items() if v is not None}  # some need 2+ cells

    status = runs["status"].value_counts().to_dict()
    lines = [f"# Ablation report: {study}", "",
             f"{len(runs)} runs ({', '.join(f'{k} {v}' for k, v in sorted(status.items()))}); "
             f"factors: {', '.join(rep.factors)}; seeds: {runs['seed'].nunique()}"
             + (f"; design: {rep.design}" if rep.design else "")
             + f". Generated {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "How runs are counted: crashed or interrupted attempts are excluded; diverged runs stay "
             "in: divergence is a rate, and a diverged run's F1 counts as 0 (its model outputs NaN "
             "and predicts no chorus frame); loss and grad-norm effects use the runs where they are "
             "finite (`dropped` says how many were left out).", ""]
    lines += _search_sections(rep) if search else _effect_sections(rep)
    if "effects" in rep.figures:  # where a reader looks first: right under the verdicts
        at = next((i for i, l in enumerate(lines) if l.startswith("Rule applied: ")), len(lines))
        lines[at:at] = ["### Effects with 95 % CIs (F1 and divergence rate, every fix)", "",
                        "![effects](effects.png)", ""]
    if rep.stress:
        from ablations.results import stability_report

        st_lines, st_figs = stability_report.section(
            runs, rep.factors, rep.stress, out_dir, analysis.to_markdown, rep.stability_effects,
            rep.crashed if len(rep.crashed) else None)
        lines += st_lines
        rep.figures.update(st_figs)
    lines += ["## Figures", ""]
    for name, fig in rep.figures.items():
        if f"![{name}]({fig.name})" not in lines:
            lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({fig.name})", ""]
    if "first_nonfinite" not in rep.figures:
        (out_dir / "first_nonfinite.png").unlink(missing_ok=True)  # an earlier report's
        lines += ["### first non-finite", "", f"No run went non-finite ({len(runs)} runs): no "
                  f"figure.", ""]
    cell_table = (runs.groupby("cell").agg(runs=("seed", "size"), diverged=("diverged", "sum"),
                                           collapsed=("collapsed", "sum"),
                                           f1_mean=("final_val_f1", "mean"),
                                           f1_sd=("final_val_f1", "std"))
                  .sort_values("f1_mean", ascending=False).reset_index())
    lines += ["## Cells", "", "`runs` counts runs (cell x seed); `f1_sd` is the spread over them.",
              "", analysis.to_markdown(cell_table), ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines))
    rep.markdown = md
    from ablations.results.report_html import write_html

    rep.html = write_html(md)  # what MLflow previews, figures included
    (out_dir / "effects.csv").write_text(analysis.buffer_csv(rep.effects))
    (out_dir / "runs.csv").write_text(analysis.buffer_csv(runs))
    return rep


def _effect_sections(rep: Report) -> list[str]:
    factorial = bool(rep.fits)
    per_background = not factorial and "background" in rep.effects
    if factorial:
        how = ("Effects of continuous outcomes come from the design's own linear model: OLS on the "
               "factors coded -1/+1 with all main effects and the estimable two-factor "
               "interactions, seeds as replicates. **Effect = 2 x coefficient** (the DOE textbook "
               "convention): the mean at + (on) minus the mean at - (off), averaged over the other "
               "factors. 95 % CIs are t intervals from the residual error (with 30 or more seeds "
               "a seed-cluster bootstrap is shown beside them as `boot_low`/`boot_high`; with "
               "fewer it covers too little to be shown: 75 % at 3 seeds, 91 % at 10); an unreplicated design uses Lenth's "
               "pseudo standard error and the half-normal plot.")
    elif per_background:
        how = ("One at a time: each fix is judged in two backgrounds, separately: *added to "
               "broken* (add:X minus broken) and *dropped from fixed* (fixed minus drop:X), per "
               "regime. Two runs are paired only when they share the seed and the stress cell; "
               "with an lr ladder each seed's differences are averaged over the rungs both runs "
               "have (`rungs`). 95 % CIs are t intervals over the seeds (an interval is not shown "
               "where every seed agrees: `note`). `backgrounds`: *opposite* when both intervals "
               "exclude 0 with opposite signs, *differ* when the difference of the two effects "
               "excludes 0, *agree* otherwise.")
    else:
        how = ("Effects of continuous outcomes are on minus off (or level minus the first level), "
               "paired by the other factors and seed where the design allows (`paired`), with 95 % "
               "t CIs (Welch's where unpaired).")
    how += (" Rate differences (divergence, collapse) get Newcombe's score intervals, paired "
            "where the design pairs runs; 0/n vs 0/n is shown as such, with its real interval.")
    # verdicts first, then (write_report inserts it) the effects figure, then how they were made
    lines = ["## Verdicts on the seed's claims", ""]
    if rep.verdicts.empty:
        lines += ["No fix of the seed is a factor of this study.", ""]
    else:
        lines += [analysis.to_markdown(rep.verdicts[["fix", "critical", "verdict", "reason",
                                                     "claim"]]), "",
                  analysis.critical_agreement(rep.verdicts), ""]
    lines += [f"Rule applied: {RULE}", "", "## How effects are estimated", "", how, ""]
    if factorial:
        f1 = rep.fits.get("final_val_f1")
        lines += ["## Factorial model", "",
                  f"Aliases: {rep.aliases.source}." if rep.aliases else ""]
        for fit in rep.fits.values():
            lines += ["", f"- {fx.describe(fit)}"] + [f"  - {n}" for n in fit.notes]
        if f1 is not None:
            lines += ["", "### final F1: every term", "", analysis.to_markdown(f1.table, ".4f"), ""]
    eff = rep.effects
    if per_background:
        lines += _background_sections(rep)
    elif not eff.empty:
        cont = eff[~eff.outcome.isin(["diverged", "collapsed"])]
        keep = [c for c in ["factor", "contrast", "outcome", "effect", "low", "high", "p", "n",
                            "paired", "dropped", "mean_off", "mean_on", "aliases"]
                if c in cont and not (factorial and c == "paired")]  # model effects: no pairs
        lines += ["## Main effects", "", analysis.to_markdown(cont[keep]), "",
                  "## Rate differences (on minus off)", "",
                  analysis.to_markdown(eff[eff.outcome.isin(["diverged", "collapsed"])][
                      ["factor", "outcome", "counts", "effect", "low", "high", "p", "method"]]), ""]
    if not rep.interactions.empty:
        inter = rep.interactions.reindex(rep.interactions["effect"].abs().sort_values(
            ascending=False).index)
        cols = [c for c in ["a", "b", "effect", "low", "high", "p", "aliases", "n", "paired"]
                if c in inter]
        lines += ["## Two-factor interactions on final F1", "",
                  ("AB = 2 x its coefficient: half of (effect of A with B on) minus (effect of A "
                   "with B off)." if factorial else
                   "AB = half of (effect of A with B on) minus (effect of A with B off)."), "",
                  analysis.to_markdown(inter[cols]), ""]
    if not rep.path.empty:
        lines += ["## Ablation path (greedy, final F1)", "", analysis.to_markdown(rep.path), ""]
    return lines


def _background_sections(rep: Report) -> list[str]:
    """One-at-a-time tables: one row per fix x background x regime, the rungs stated."""
    eff = rep.effects
    cols = ["factor", "background", "regime", "rungs", "effect", "low", "high", "p", "n", "note",
            "backgrounds", "mean_off", "mean_on"]
    lines = ["## One at a time: final F1 per fix, background and regime", "",
             analysis.to_markdown(eff[eff.outcome == "final_val_f1"][cols]), ""]
    others = eff[eff.outcome.isin(["best_val_f1", "final_val_loss", "max_grad_norm"])]
    if not others.empty:
        lines += ["## One at a time: other outcomes", "",
                  "`dropped`: pairs left out because the outcome was not measurable (a diverged "
                  "run has no loss).", "",
                  analysis.to_markdown(others[["factor", "background", "regime", "outcome",
                                               "effect", "low", "high", "n", "dropped", "note",
                                               "backgrounds"]]), ""]
    rt = eff[eff.outcome.isin(["diverged", "collapsed"])]
    if not rt.empty:
        lines += ["## Rate differences per background (fix on minus off)", "",
                  "Paired by seed and stress cell (Newcombe). `untested`: 0/n vs 0/n or n/n vs "
                  "n/n, which no test can reject. `p` is unadjusted: the tests the verdicts rest "
                  "on, and their Holm-adjusted p, are listed in each verdict.", "",
                  analysis.to_markdown(rt[["factor", "background", "regime", "rungs", "outcome",
                                           "counts", "effect", "low", "high", "p", "untested",
                                           "backgrounds"]]), ""]
    return lines


def _search_sections(rep: Report) -> list[str]:
    note = rep.importance.attrs.get("note", "")
    return ["## Search design: importance and associations, no verdicts", "",
            "The sampler chose which cells ran, so a fix's \"on minus off\" here is confounded "
            "with everything the sampler chose along with it: this report gives no effects and no "
            "verdicts. Run a factorial or one-at-a-time study to test the claims.", "",
            f"### Importance ({note})", "", analysis.to_markdown(rep.importance), "",
            "### Associations (descriptive; runs counted per level)", "",
            analysis.to_markdown(rep.associations), ""]


def run_summary(rep: Report) -> tuple[list[tuple[str, str]], str, str, int]:
    """What the launch run's description says of the report (the tracker writes it:
    ablations.tracking.tracker.attach_report): (fix, verdict) pairs, the verdict table in
    Markdown, the critical-agreement line, and the number of runs."""
    if rep.verdicts.empty:
        return [], "", "", len(rep.runs)
    verdicts = list(zip(rep.verdicts["fix"], rep.verdicts["verdict"]))
    table = analysis.to_markdown(rep.verdicts[["fix", "critical", "verdict", "evidence"]])
    return verdicts, table, analysis.critical_agreement(rep.verdicts), len(rep.runs)


def verdict_lines(rep: Report) -> list[str]:
    """The verdicts as short lines for the terminal."""
    if rep.design == "search":
        top = ", ".join(f"{r.factor} {r.importance:.2f}" for r in rep.importance.itertuples())
        return ["  search design: no verdicts (the sampler chose the cells); fANOVA importance: "
                + (top or "n/a")]
    out = []
    for r in rep.verdicts.itertuples():
        head = r.reason.split(". ")[0].split(": ", 1)[-1]
        out.append(f"  {r.fix:<15} {r.verdict:<12} {head[:240]}")
        out += [f"  {'':<15} {'':<12} {d}" for d in getattr(r, "decisive", None) or []]
        frag = getattr(r, "fragility", None)
        if frag is not None and frag == frag:  # (NaN where the verdict has none)
            out.append(f"  {'':<15} {'':<12} fragility: {runs_text(int(frag))} with the other "
                       f"outcome (failed / not failed) would undo it")
    if not rep.verdicts.empty:
        out.append("  " + analysis.critical_agreement(rep.verdicts))
    if not rep.stability_effects.empty:
        lay = stability.layout(rep.runs, rep.factors, rep.stress)
        out.append(f"stability: each fix's shift of log10 LR50 ({lay.axis} at which half the runs "
                   f"fail; 95% profile-likelihood CI), per background; the report has the "
                   f"unstable rate and LR sensitivity:")
        out += stability.summary_lines(rep.stability_effects, lay)
    return out

