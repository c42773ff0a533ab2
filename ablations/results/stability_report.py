"""The stability section of the report: final loss vs lr, the stability map, the tables.

Drawn only for studies with `stress:` factors (ablations/results/stability.py defines the outcomes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ablations.results import stability  # noqa: E402
from ablations.results.stability import StressLayout  # noqa: E402

ANCHORS = {"broken": ("black", 2.4), "fixed": ("#1f77b4", 2.4)}


def _recipes(df: pd.DataFrame) -> list[str]:
    """broken and fixed first, then add:X, then drop:X, then the rest, as they come."""
    names = list(dict.fromkeys(df["recipe"]))
    key = {n: (0 if n.split("/")[0] == "broken" else 1 if n.split("/")[0] == "fixed" else
               2 if n.startswith("add:") else 3 if n.startswith("drop:") else 4) for n in names}
    return sorted(names, key=lambda n: (key[n], names.index(n)))


def fig_loss_vs_lr(runs: pd.DataFrame, lay: StressLayout, out: Path) -> Optional[Path]:
    """Per regime: final validation loss (capped at the loss at initialisation, non-finite
    counted as it: the quantity LR sensitivity averages) vs the axis, median over seeds, one
    line per recipe; x where a seed diverged, o where one collapsed."""
    if not lay.has_axis:
        return None
    df = stability.annotate(runs, lay)
    df = df.assign(capped=stability.capped_loss(df))
    regimes = list(dict.fromkeys(df["regime"]))
    recipes = _recipes(df)
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.2 * len(regimes) + 2.8, 4.6),
                             squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, regime in zip(axes[0], regimes):
        sub = df[df.regime == regime]
        for k, recipe in enumerate(recipes):
            g = sub[sub.recipe == recipe]
            if g.empty:
                continue
            med = g.groupby(lay.axis)["capped"].median()
            color, lw = ANCHORS.get(recipe.split("/")[0], (cmap(k % 20), 1.0))
            ax.plot(med.index, med.values, color=color, lw=lw, marker=".", label=recipe)
            for status, marker in (("diverged", "x"), ("collapsed", "o")):
                at = sorted(g.loc[g.status == status, lay.axis].unique())
                style = {"color": color} if marker == "x" else {"facecolors": "none",
                                                                  "edgecolors": color}
                ax.scatter(at, med.reindex(at), marker=marker, s=36, zorder=3, **style)
        if (sub[lay.axis] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(lay.axis)
        ax.set_title(regime, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss, capped at init loss\n(median over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, title="recipe (x diverged, o "
               "collapsed)", title_fontsize=7)
    fig.suptitle(f"Final loss vs {lay.axis} per recipe", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    path = out / "loss_vs_lr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_stability_map(runs: pd.DataFrame, lay: StressLayout, out: Path) -> Optional[Path]:
    """Recipe x stress rung, coloured by the share of seeds that diverged or collapsed, with the
    counts written in (d = diverged, c = collapsed). One panel per regime; without an axis, one
    panel with a column per regime."""
    rates = stability.rung_rates(runs, lay)
    if rates.empty:
        return None
    df = stability.annotate(runs, lay)
    recipes = _recipes(df)
    if lay.has_axis:
        panels = list(dict.fromkeys(rates["regime"]))
        column = lay.axis
    else:
        panels, column = ["all"], "regime"
        rates = rates.assign(panel="all")
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(5.0, 1.0 * rates[column].nunique() + 3.2) * len(panels),
                                      0.32 * len(recipes) + 1.8))
    im = None
    for i, (ax, panel) in enumerate(zip(axes[0], panels)):
        sub = rates[rates.regime == panel] if lay.has_axis else rates
        cols = sorted(sub[column].unique()) if lay.has_axis else list(dict.fromkeys(sub[column]))
        grid = np.full((len(recipes), len(cols)), np.nan)
        for r in sub.itertuples():
            grid[recipes.index(r.recipe), cols.index(getattr(r, column))] = r.fail_rate
            txt = "".join(f"{n}{k}" for n, k in ((r.diverged, "d"), (r.collapsed, "c")) if n)
            ax.text(cols.index(getattr(r, column)), recipes.index(r.recipe), txt or "·",
                    ha="center", va="center", fontsize=7,
                    color="white" if r.fail_rate > 0.6 else "black")
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="Reds", aspect="auto")
        ax.set_xticks(range(len(cols)),
                      [f"{c:g}" if isinstance(c, float) else str(c) for c in cols],
                      rotation=30 if not lay.has_axis else 0, fontsize=8)
        ax.set_yticks(range(len(recipes)), recipes if i == 0 else [""] * len(recipes), fontsize=7)
        ax.set_xlabel(column)
        ax.set_title(panel if lay.has_axis else "regime", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of seeds diverged or collapsed",
                 fraction=0.03)
    fig.suptitle("Stability map (d = diverged, c = collapsed, · = all stable)", fontsize=11)
    path = out / "stability_map.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def section(runs: pd.DataFrame, factors: list[str], stress: list[str], out: Path,
            to_markdown, effects: Optional[pd.DataFrame] = None,
            crashed: Optional[pd.DataFrame] = None) -> tuple[list[str], dict[str, Path]]:
    """Markdown lines and figures of the stability section (`effects`: stability.fix_effects,
    computed here when not given)."""
    lay = stability.layout(runs, factors, stress)
    figs = {"loss_vs_lr": fig_loss_vs_lr(runs, lay, out),
            "stability_map": fig_stability_map(runs, lay, out)}
    figs = {k: v for k, v in figs.items() if v is not None}
    axis = lay.axis or "-"
    lines = ["## Stability under stress", "",
             f"Stress factors: {', '.join(stress)}; axis: {axis}; regimes: "
             f"{', '.join(lay.regime) or '-'}. A run is stable when its final model is finite "
             "and not collapsed; `clean` counts runs with no non-finite event at all; a run that "
             "is missing or crashed is never counted as stable (`runs`: k of n). LR sensitivity "
             "is Wortsman et al. 2023 (arXiv 2309.14322, sec. 2.2): the mean over the ladder of "
             "min(final val loss, l0) - l*, non-finite losses counted as l0, the validation loss "
             "of the initial model (before any update), l* the best capped loss of the sweep; "
             "undefined (nan) where no rung improves on l0. Lower is less sensitive.", ""]
    if lay.has_axis:
        lines += [f"**The edge as an estimate.** Each seed's upper edge lies between its last "
                  f"stable rung and its first failed one, read from the recipe's best rung up "
                  f"(`best_{axis}`: the lowest median final loss among rungs where most seeds are "
                  f"stable; failures below it are too slow, not unstable: `failed_below_best`). "
                  f"The seeds' edges are modelled as normal in log10 {axis} (a probit "
                  f"dose-response, with each seed's runs counted as one interval-censored "
                  f"tolerance, not as independent runs); LR50, the {axis} at which half the runs "
                  f"fail, has a profile-likelihood 95 % interval calibrated for few seeds "
                  f"(ablations/results/edges.py). Separation (every seed failing between the same two "
                  f"rungs) is handled by the profile likelihood itself: the interval then spans "
                  f"the rungs. An edge past the ladder is printed as a bound ('> 10'), never as a "
                  f"number. `max_stable_{axis}` is the descriptive rung table: the largest rung "
                  f"at which every seed is stable.", ""]
    table = stability.recipe_table(runs, lay, crashed)
    if not table.empty:
        t = table.copy()
        col = f"max_stable_{lay.axis}"
        t[col] = t[col].map(lambda v: "none" if math.isnan(v) else f"{v:g}")
        t[f"best_{lay.axis}"] = t[f"best_{lay.axis}"].map(
            lambda v: "none" if math.isnan(v) else f"{v:g}")
        t["LR sensitivity [95% CI]"] = [
            (f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else
             f"{m:.3f} ({note})" if math.isfinite(m) else note or "nan")
            for m, lo, hi, note in zip(t.lr_sensitivity, t.lrs_low, t.lrs_high, t.lrs_note)]
        keep = [c for c in t.columns if c not in ("lr50_log10", "lr50_low", "lr50_high",
                                                   "lr_sensitivity", "lrs_low", "lrs_high",
                                                   "lrs_note", "incomplete")]
        lines += [f"### The edge ({axis}) and LR sensitivity per recipe", "", to_markdown(t[keep]),
                  ""]
    if effects is None:
        effects = stability.fix_effects(runs, lay, crashed)
    if not effects.empty:
        e = effects[["fix", "background", "regime", "outcome", "shown", "p", "n", "counts",
                     "note", "backgrounds"]].rename(columns={"shown": "effect [95% CI]"})
        lines += ["### Each fix's effect on stability, per background and regime", "",
                  f"`edge_shift`: log10 LR50 with the fix on minus off (+1 = a ten times larger "
                  f"{axis} before half the runs fail); `> x` / `< x`: one edge lies past the "
                  f"ladder, so only a bound is known. `unstable_rate`: share of runs that "
                  f"diverged or collapsed at and above the best rung of both recipes (`note`), "
                  f"paired by seed and rung (Newcombe). `lr_sensitivity`: over the rungs both "
                  f"recipes ran, paired by seed (t). `backgrounds`: do *added to broken* and "
                  f"*dropped from fixed* agree."
                  + (" `peak_<curve>` (the recipe's curve, e.g. the Transformer's largest "
                     "attention logit): log10 of each run's peak with the fix on over off, "
                     "averaged over the rungs both ran, paired by seed (t); -1 = ten times "
                     "smaller." if stability.curve_peaks(runs) else ""), "", to_markdown(e), ""]
        hurt = stability.hurts(effects)
        lines += ["### Fixes that hurt stability somewhere", ""]
        lines += ([f"- {r.fix} ({r.background}, {r.regime}): {r.outcome} {r.shown}, n={r.n}"
                   for r in hurt.itertuples()]
                  or ["None with a CI excluding zero."]) + [""]
    rates = stability.rung_rates(runs, lay)
    if not rates.empty:
        lines += ["### Divergence and collapse per rung", "", to_markdown(rates), ""]
    places = stability.first_nonfinite(runs, lay)
    lines += ["### Where runs first went non-finite, per regime", ""]
    lines += [to_markdown(places) if not places.empty else "No run went non-finite.", ""]
    if figs:
        lines += ["Figures: " + ", ".join(f"[{n.replace('_', ' ')}]({p.name})" for n, p in
                                         figs.items()) + " (drawn below).", ""]
    return lines, figs


def _spacing(runs: pd.DataFrame, lay: StressLayout) -> str:
    ladder = sorted(runs[lay.axis].dropna().unique())
    if len(ladder) < 2:
        return "one rung"
    if ladder[0] > 0:
        steps = np.diff(np.log10(ladder))
        return f"{steps.min():.2g}" + (f"..{steps.max():.2g}" if steps.max() > steps.min() + 1e-9
                                       else "") + " in log10"
    return f"{np.diff(ladder).min():g}"
