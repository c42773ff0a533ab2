"""The study report: figures (PNG) and a Markdown file with verdicts and effects.

    python runner.py report studies/quick.yaml  # -> reports/quick/report.md, report.html, *.png

Every figure reads from `ablations.results.analysis` only; the tracker attaches the report to the
study's latest launch run in MLflow under `report/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ablations.design.fixes import FIXES  # noqa: E402
from ablations.results import analysis, backgrounds, effects as fx, rates, stability  # noqa: E402
from ablations.results.verdicts import RULE  # noqa: E402

OFF_ON_COLORS = {"off": "#d62728", "on": "#1f77b4"}
CURVE_METRICS = [("train/loss", "train loss", True), ("train/grad_norm", "pre-clip grad norm", True),
                 ("train/chorus_pct", "frames predicted chorus (%)", False)]


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


def _arm(runs: pd.DataFrame, f: str, value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    return f"{f}={value:g}" if isinstance(value, float) else f"{f}={value}"


# ------------------------------------------------------------------------------ figures
def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame, factors: list[str],
               out: Path) -> Optional[Path]:
    """Per factor (rows) x metric (columns): median over runs per step, inter-quartile band, for
    each arm; x marks where diverged runs first went non-finite."""
    facs = fx.two_level(runs, factors)
    if not facs:
        return None
    fig, axes = plt.subplots(len(facs), len(CURVE_METRICS), figsize=(13, 2.6 * len(facs) + 0.6),
                             squeeze=False)
    for i, f in enumerate(facs):
        levels = sorted(runs[f].dropna().unique())
        for j, (metric, label, logy) in enumerate(CURVE_METRICS):
            ax = axes[i][j]
            sub = curves[curves.metric == metric]
            for k, lv in enumerate(levels):
                arm = sub[sub[f] == lv]
                name = _arm(runs, f, lv)
                color = OFF_ON_COLORS.get(name, f"C{k}")
                if arm.empty:
                    continue
                vals = arm.assign(value=arm["value"].where(np.isfinite(arm["value"])))
                g = vals.groupby("step")["value"]
                q = pd.DataFrame({"lo": g.quantile(0.25), "med": g.median(), "hi": g.quantile(0.75)})
                q = q.rolling(5, min_periods=1).mean()  # per-step values are noisy
                ax.plot(q.index, q["med"], color=color, lw=1.5, label=f"{name} (median)")
                ax.fill_between(q.index, q["lo"], q["hi"], color=color, alpha=0.2, lw=0)
                div = runs[(runs[f] == lv) & (runs.status == "diverged")]
                if len(div):
                    ax.scatter(div["first_nonfinite_step"], np.full(len(div), 0.98),
                               transform=ax.get_xaxis_transform(), marker="x", color=color, s=30,
                               label=f"{name}: diverged ({len(div)})")
            if logy:
                ax.set_yscale("log")
                # ticks at 1-2-5 steps labelled 0.2, not 2x10^-1; no crowded minor labels
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if metric == "train/chorus_pct":
                ax.axhspan(0, 1, color="grey", alpha=0.15)
                ax.axhspan(99, 100, color="grey", alpha=0.15)
                ax.set_ylim(-2, 102)
            ax.set_title(f"{f}: {label}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Training curves by fix (median and inter-quartile band over runs; "
                 "grey bands on chorus%: collapse zones)", fontsize=10)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_divergence_heatmap(runs: pd.DataFrame, factors: list[str], out: Path) -> Optional[Path]:
    """Divergence rate among runs with fix A and fix B both off (diagonal: A off alone)."""
    facs = [f for f in fx.two_level(runs, factors) if f in FIXES]
    n = len(facs)
    if n == 0:
        return None
    rate = np.full((n, n), np.nan)
    count = np.zeros((n, n), dtype=int)
    for i, a in enumerate(facs):
        for j, b in enumerate(facs):
            sel = runs[(runs[a] == False) & (runs[b] == False)]  # noqa: E712
            count[i, j] = len(sel)
            if len(sel):
                rate[i, j] = sel["diverged"].mean()
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.0 * n + 1.6))
    im = ax.imshow(rate, vmin=0, vmax=1, cmap="Reds")
    for i in range(n):
        for j in range(n):
            txt = "-" if np.isnan(rate[i, j]) else f"{rate[i, j]:.2f}\nn={count[i, j]}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if not np.isnan(rate[i, j]) and rate[i, j] > 0.6 else "black")
    ax.set_xticks(range(n), [f"{f} off" for f in facs], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{f} off" for f in facs], fontsize=8)
    fig.colorbar(im, ax=ax, label="divergence rate")
    total = int(runs["diverged"].sum())
    ax.set_title(f"Divergence rate with both fixes off ({total}/{len(runs)} runs diverged)",
                 fontsize=10)
    fig.tight_layout()
    path = out / "divergence_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_first_nonfinite(runs: pd.DataFrame, out: Path) -> Optional[Path]:
    """Step of the first non-finite value per cell (one dot per seed); 'never' at the right.
    None when no run went non-finite: the figure would be empty (the report says so instead)."""
    went = runs[runs["first_nonfinite_step"] < runs["steps"].fillna(np.inf)]
    if went.empty:
        return None
    cells = sorted(runs["cell"].unique())
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(cells) + 1.5))
    steps = runs["steps"].max() if "steps" in runs and runs["steps"].notna().any() else 1
    never = runs.drop(went.index)
    ypos = {c: i for i, c in enumerate(cells)}
    ax.scatter(went["first_nonfinite_step"], went["cell"].map(ypos), color="#d62728", s=18,
               label="first non-finite step")
    ax.scatter(np.full(len(never), steps * 1.02), never["cell"].map(ypos), color="#999999",
               marker="|", s=40, label="never non-finite")
    ax.set_yticks(range(len(cells)), cells, fontsize=7)
    ax.set_xlim(0, steps * 1.06)
    ax.set_xlabel("training step")
    ax.set_title("Time to first non-finite value per cell", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "first_nonfinite.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_effects(effects: pd.DataFrame, out: Path) -> Optional[Path]:
    """Main effects with 95 % CIs on final F1 and on the divergence rate."""
    if effects.empty:
        return None
    panels = [("final_val_f1", "effect on final val chorus F1 (diverged = 0)"),
              ("diverged", "effect on divergence rate")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * effects["factor"].nunique() + 2.2),
                             squeeze=False)
    for ax, (outcome, title) in zip(axes[0], panels):
        e = effects[effects.outcome == outcome].reset_index(drop=True)
        labels = [f"{r.factor} ({r.contrast}, n={_n(r)})" for r in e.itertuples()]
        y = np.arange(len(e))
        err = np.vstack([e["effect"] - e["low"], e["high"] - e["effect"]]).clip(min=0)
        colors = ["#1f77b4" if (r.low > 0 or r.high < 0) else "#aaaaaa" for r in e.itertuples()]
        ax.barh(y, e["effect"], xerr=err, color=colors, capsize=3)
        for yi, r in zip(y, e.itertuples()):
            ax.annotate(f"{r.effect:+.3f}", (r.effect, yi), textcoords="offset points",
                        xytext=(4 if r.effect >= 0 else -4, 6), fontsize=7,
                        ha="left" if r.effect >= 0 else "right")
        if outcome == "diverged" and (e["mean_off"].fillna(0) == 0).all() and \
                (e["mean_on"].fillna(0) == 0).all():
            ax.text(0.5, 0.5, "no run diverged in either arm", transform=ax.transAxes,
                    ha="center", va="center", fontsize=10, color="#555555")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("on minus off (95% CI; blue = CI excludes 0)", fontsize=8)
    fig.tight_layout()
    path = out / "effects.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _n(r) -> str:
    """Runs behind an effect: `counts` (rates: "8/16 vs 8/16") or `n` (continuous outcomes)."""
    counts = getattr(r, "counts", None)
    if isinstance(counts, str) and counts:
        return counts
    n = getattr(r, "n", None)
    return "?" if n is None or (isinstance(n, float) and np.isnan(n)) else f"{int(n)}"


def fig_path(path_df: pd.DataFrame, out: Path, outcome: str) -> Optional[Path]:
    if path_df.empty or len(path_df) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(path_df["step"], path_df["mean"], marker="o")
    for r in path_df.itertuples():
        label = r.flipped if r.step else "all off"
        ax.annotate(f"{label}\n{r.mean:.3f}", (r.step, r.mean), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xlabel("fixes switched on (greedy order)")
    ax.set_ylabel(f"mean {outcome}")
    ax.set_title("Ablation path from the broken to the fixed recipe (Fawcett & Hoos 2016)",
                 fontsize=10)
    ax.margins(y=0.25)
    fig.tight_layout()
    p = out / "ablation_path.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ------------------------------------------------------------------------------ report
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
            factors: Optional[list[str]] = None) -> Report:
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
    claims = analysis.claim_estimates(runs, factors, in_runs, stab)
    return Report(study, runs, factors, effects, analysis.verdicts(effects, runs, claims),
                  inter, oat, analysis.ablation_path(runs, factors), design=design, fits=fits,
                  aliases=aliases, stress=stress, stability_effects=stab, crashed=crashed,
                  rate_tests=backgrounds.public(rate_tests))


def write_report(study: str, tracking_uri: Optional[str], out_dir: Path, plan=None,
                 design: str = "", objective: str = "final_val_f1") -> Report:
    """Analyse the study, draw the figures, write report.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = analyse(study, tracking_uri, plan, design)
    runs = rep.runs
    curves = analysis.load_curves(study, [m for m, _, _ in CURVE_METRICS], tracking_uri, runs)
    search = rep.design == "search"
    figures = {"curves": fig_curves(curves, runs, rep.factors, out_dir),
               "effects": fig_effects(rep.effects, out_dir),
               "half_normal": (fig_half_normal(rep.fits["final_val_f1"], out_dir)
                               if "final_val_f1" in rep.fits else None),
               "divergence_heatmap": fig_divergence_heatmap(runs, rep.factors, out_dir),
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


def fig_half_normal(fit: fx.FactorialFit, out: Path) -> Optional[Path]:
    """Daniel's half-normal plot of the effects on final F1; Lenth's margin of error dashed."""
    eff = fit.table.set_index("term")["effect"]
    if len(eff) < 3:
        return None
    hn = fx.half_normal(eff)
    pse, me, _ = fx.lenth(eff.to_numpy())
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.scatter(hn["abs_effect"], hn["quantile"], color="#1f77b4", s=22)
    for r in hn.tail(min(5, len(hn))).itertuples():
        ax.annotate(r.term, (r.abs_effect, r.quantile), textcoords="offset points",
                    xytext=(-4, 4), ha="right", fontsize=7)
    if np.isfinite(pse) and pse > 0:
        q = np.linspace(0, hn["quantile"].max() * 1.05, 20)
        ax.plot(q * pse, q, color="grey", lw=0.8, label="null line (slope: Lenth PSE)")
        ax.axvline(me, color="grey", ls="--", lw=0.8, label=f"Lenth ME {me:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("|effect| on final F1 (2 x OLS coefficient)")
    ax.set_ylabel("half-normal quantile")
    ax.set_title(f"Half-normal plot of the {len(hn)} effects (Daniel): points off the line are "
                 f"real", fontsize=9)
    fig.tight_layout()
    p = out / "half_normal.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


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
    if not rep.verdicts.empty:
        out.append("  " + analysis.critical_agreement(rep.verdicts))
    if not rep.stability_effects.empty:
        lay = stability.layout(rep.runs, rep.factors, rep.stress)
        out.append(f"stability: each fix's shift of log10 LR50 ({lay.axis} at which half the runs "
                   f"fail; 95% profile-likelihood CI), per background; the report has the "
                   f"unstable rate and LR sensitivity:")
        out += stability.summary_lines(rep.stability_effects, lay)
    return out

