"""The report's figures (PNG, matplotlib Agg): training curves by fix, effects with their
intervals, the divergence heatmap, where runs first went non-finite, the ablation path and the
half-normal plot. ablations/results/report.py draws them into the report; the notebooks call
them directly (also as report.fig_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ablations.design.fixes import FIXES, Fix  # noqa: E402
from ablations.results import effects as fx  # noqa: E402

OFF_ON_COLORS = {"off": "#d62728", "on": "#1f77b4"}
CURVE_METRICS = [("train/loss", "train loss", True), ("train/grad_norm", "pre-clip grad norm", True),
                 ("train/chorus_pct", "frames predicted chorus (%)", False)]


def _arm(runs: pd.DataFrame, f: str, value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    return f"{f}={value:g}" if isinstance(value, float) else f"{f}={value}"


# ------------------------------------------------------------------------------ figures
def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame, factors: list[str],
               out: Path, metrics: Optional[list[tuple[str, str, bool]]] = None) -> Optional[Path]:
    """Per factor (rows) x metric (columns): median over runs per step, inter-quartile band, for
    each arm; x marks where diverged runs first went non-finite."""
    facs = fx.two_level(runs, factors)
    if not facs:
        return None
    metrics = metrics or CURVE_METRICS
    fig, axes = plt.subplots(len(facs), len(metrics), figsize=(4.3 * len(metrics) + 0.1,
                                                               2.6 * len(facs) + 0.6), squeeze=False)
    for i, f in enumerate(facs):
        levels = sorted(runs[f].dropna().unique())
        for j, (metric, label, logy) in enumerate(metrics):
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


def fig_divergence_heatmap(runs: pd.DataFrame, factors: list[str], out: Path,
                           fixes: Mapping[str, Fix] = FIXES) -> Optional[Path]:
    """Divergence rate among runs with fix A and fix B both off (diagonal: A off alone)."""
    facs = [f for f in fx.two_level(runs, factors) if f in fixes]
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
