"""The study report: figures (PNG) and a Markdown file with verdicts and effects.

    python runner.py report studies/quick.yaml          # -> reports/quick/report.md + *.png

Every figure reads from `ablations.analysis` only; the report is also logged to the study's
latest launch (parent) run in MLflow under `report/`.
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

from ablations import analysis  # noqa: E402
from ablations.fixes import FIXES  # noqa: E402

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
    figures: dict[str, Path] = field(default_factory=dict)
    markdown: Optional[Path] = None


def two_level(runs: pd.DataFrame, factors: list[str]) -> list[str]:
    return [f for f in factors if runs[f].nunique(dropna=True) == 2]


def _arm(runs: pd.DataFrame, f: str, value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    return f"{f}={value:g}" if isinstance(value, float) else f"{f}={value}"


# ------------------------------------------------------------------------------ figures
def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame, factors: list[str],
               out: Path) -> Optional[Path]:
    """Per factor (rows) x metric (columns): median over runs per step, inter-quartile band, for
    each arm; x marks where diverged runs first went non-finite."""
    facs = two_level(runs, factors)
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
    facs = [f for f in two_level(runs, factors) if f in FIXES]
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
        labels = [f"{r.factor} ({r.contrast})" for r in e.itertuples()]
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
        ax.set_xlabel("on minus off (95% bootstrap CI; blue = CI excludes 0)", fontsize=8)
    fig.tight_layout()
    path = out / "effects.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
def analyse(study: str, tracking_uri: Optional[str], plan=None) -> Report:
    runs = analysis.load_runs(study, tracking_uri, plan=plan)
    if runs.empty:
        raise LookupError(f"study {study!r} has no finished runs in {tracking_uri}")
    factors = analysis.factor_names(runs)
    effects = analysis.main_effects(runs, factors)
    return Report(study, runs, factors, effects, analysis.verdicts(effects, runs),
                  analysis.interactions(runs, factors),
                  analysis.one_at_a_time(runs) if runs["roles"].str.len().gt(0).any()
                  else pd.DataFrame(),
                  analysis.ablation_path(runs, factors))


def write_report(study: str, tracking_uri: Optional[str], out_dir: Path, plan=None,
                 design: str = "", objective: str = "final_val_f1") -> Report:
    """Analyse the study, draw the figures, write report.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = analyse(study, tracking_uri, plan)
    runs = rep.runs
    curves = analysis.load_curves(study, [m for m, _, _ in CURVE_METRICS], tracking_uri, runs)
    figures = {"curves": fig_curves(curves, runs, rep.factors, out_dir),
               "effects": fig_effects(rep.effects, out_dir),
               "divergence_heatmap": fig_divergence_heatmap(runs, rep.factors, out_dir),
               "first_nonfinite": fig_first_nonfinite(runs, out_dir),
               "ablation_path": fig_path(rep.path, out_dir, objective)}
    rep.figures = {k: v for k, v in figures.items() if v is not None}  # some need 2+ cells

    status = runs["status"].value_counts().to_dict()
    eff = rep.effects.copy()
    eff_table = pd.DataFrame() if eff.empty else eff[eff.outcome.isin(["diverged", "collapsed", "final_val_f1", "best_val_f1",
                                      "final_val_loss", "max_grad_norm"])][
        ["factor", "contrast", "outcome", "effect", "low", "high", "n", "paired", "dropped",
         "mean_off", "mean_on"]]
    lines = [f"# Ablation report: {study}", "",
             f"{len(runs)} runs ({', '.join(f'{k} {v}' for k, v in sorted(status.items()))}); "
             f"factors: {', '.join(rep.factors)}; seeds: {runs['seed'].nunique()}"
             + (f"; design: {design}" if design else "") + f". Generated {time.strftime('%Y-%m-%d %H:%M')}.",
             "",
             "How runs are counted: crashed or interrupted attempts are excluded; diverged runs stay "
             "in: divergence is a rate, and a diverged run's F1 counts as 0 (its model outputs NaN "
             "and predicts no chorus frame); loss and grad-norm effects use the pairs where both "
             "runs are finite (`dropped` says how many were left out). Effects are on minus off "
             "(or level minus the first level), paired by the other factors and seed where the "
             "design allows (`paired`), with 95 % bootstrap CIs.", "",
             "## Verdicts on the seed's claims", "",
             analysis.to_markdown(rep.verdicts[["fix", "critical", "verdict", "evidence", "claim"]]),
             "", analysis.critical_agreement(rep.verdicts) if not rep.verdicts.empty else
             "No fix of the seed is a factor of this study.", "",
             "## Main effects", "", analysis.to_markdown(eff_table), ""]
    if not rep.interactions.empty:
        inter = rep.interactions.reindex(rep.interactions["effect"].abs().sort_values(
            ascending=False).index)
        lines += ["## Two-factor interactions on final F1", "",
                  "AB = half of (effect of A with B on) minus (effect of A with B off).", "",
                  analysis.to_markdown(inter[["a", "b", "effect", "low", "high", "n", "paired"]]), ""]
    if not rep.one_at_a_time.empty:
        lines += ["## One at a time (final F1)", "", analysis.to_markdown(rep.one_at_a_time), ""]
    if not rep.path.empty:
        lines += ["## Ablation path (greedy, final F1)", "", analysis.to_markdown(rep.path), ""]
    lines += ["## Figures", ""]
    for name, fig in rep.figures.items():
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
    lines += ["## Cells", "", analysis.to_markdown(cell_table), ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines))
    rep.markdown = md
    (out_dir / "effects.csv").write_text(analysis.buffer_csv(rep.effects))
    (out_dir / "runs.csv").write_text(analysis.buffer_csv(runs))
    return rep


def log_to_mlflow(study: str, tracking_uri: Optional[str], out_dir: Path,
                  rep: Optional[Report] = None) -> Optional[str]:
    """Attach the report folder to the study's latest launch (parent) run and write the verdicts
    and a link to report.md into its description (and a link into the experiment's); launch
    runs whose launcher died are closed first. Returns the run id (None: no launch run)."""
    from ablations.tracking import StudyTracker

    tracker = StudyTracker(tracking_uri, study)  # (None: MLflow's default store)
    if tracker.experiment_id is None:
        return None
    verdicts, table, agreement, runs = [], "", "", 0
    if rep is not None and not rep.verdicts.empty:
        verdicts = list(zip(rep.verdicts["fix"], rep.verdicts["verdict"]))
        table = analysis.to_markdown(rep.verdicts[["fix", "critical", "verdict", "evidence"]])
        agreement = analysis.critical_agreement(rep.verdicts)
    if rep is not None:
        runs = len(rep.runs)
    return tracker.log_report(str(out_dir), verdicts, table, agreement, runs)


def verdict_lines(rep: Report) -> list[str]:
    """The verdicts as short lines for the terminal."""
    out = []
    for r in rep.verdicts.itertuples():
        out.append(f"  {r.fix:<15} {r.verdict:<12} {r.evidence.split(': ', 1)[1]}")
    if not rep.verdicts.empty:
        out.append("  " + analysis.critical_agreement(rep.verdicts))
    return out

