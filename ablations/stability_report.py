"""The stability section of the report: final loss vs lr, the stability map, the tables.

Drawn only for studies with `stress:` factors (ablations/stability.py defines the outcomes).
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

from ablations import stability  # noqa: E402
from ablations.stability import StressLayout  # noqa: E402

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
    l0 = df.groupby(["recipe", "regime", "seed"])["init_loss"].transform(
        lambda s: s[np.isfinite(s)].median() if np.isfinite(s).any() else math.log(2))
    loss = df["final_val_loss"].where(np.isfinite(df["final_val_loss"]), l0)
    df = df.assign(capped=np.minimum(loss, l0))
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
            to_markdown) -> tuple[list[str], dict[str, Path], pd.DataFrame]:
    """Markdown lines, figures and the fix-effects table of the stability section."""
    lay = stability.layout(runs, factors, stress)
    figs = {"loss_vs_lr": fig_loss_vs_lr(runs, lay, out),
            "stability_map": fig_stability_map(runs, lay, out)}
    figs = {k: v for k, v in figs.items() if v is not None}
    axis = lay.axis or "-"
    lines = ["## Stability under stress", "",
             f"Stress factors: {', '.join(stress)}; axis: {axis}; regimes: "
             f"{', '.join(lay.regime) or '-'}. A run is stable when its final model is finite "
             "and not collapsed; `clean` counts runs with no non-finite event at all. LR "
             "sensitivity is Wortsman et al. 2023 (arXiv 2309.14322, sec. 2.2): the mean over the "
             "ladder of min(final loss, l0) - l*, non-finite losses counted as l0 (the loss at "
             "initialisation: step 1's loss, before any update), l* the best capped loss of the "
             "sweep; undefined (nan) where no rung improves on l0. Lower is less sensitive.", ""]
    table = stability.recipe_table(runs, lay)
    if not table.empty:
        t = table.copy()
        col = f"max_stable_{lay.axis}"
        t[col] = t[col].map(lambda v: "none" if math.isnan(v) else f"{v:g}")
        lines += [f"### Max stable {axis} and LR sensitivity per recipe", "",
                  "max stable = the largest rung at which every seed is stable; LR sensitivity "
                  "with a 95 % t CI over seeds.", "", to_markdown(t), ""]
    effects = stability.fix_effects(runs, lay)
    if not effects.empty:
        spacing = _spacing(runs, lay)
        e = effects[["fix", "contrast", "regime", "outcome", "effect", "low", "high", "n",
                     "mean_off", "mean_on"]]
        lines += ["### Each fix's effect on stability", "",
                  f"Per regime, paired by seed. `max_stable_log10`: +1 = a ten times larger "
                  f"stable {axis}; 95 % t CI over the pairs widened by the ladder's spacing "
                  f"({spacing}) on each side, since each seed's edge is known only to a rung. "
                  "`lr_sensitivity`: t CI. `fail_rate`: share of the ladder's runs that diverged "
                  "or collapsed, Newcombe hybrid score interval of the difference.", "",
                  to_markdown(e), ""]
        hurt = stability.hurts(effects)
        lines += ["### Fixes that hurt stability somewhere", ""]
        lines += ([f"- {r.fix} ({r.contrast}, {r.regime}): {r.outcome} {r.effect:+.3f} "
                   f"[95% CI {r.low:+.3f}, {r.high:+.3f}], n={r.n}" for r in hurt.itertuples()]
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
    return lines, figs, effects


def _spacing(runs: pd.DataFrame, lay: StressLayout) -> str:
    ladder = sorted(runs[lay.axis].dropna().unique())
    if len(ladder) < 2:
        return "one rung"
    if ladder[0] > 0:
        steps = np.diff(np.log10(ladder))
        return f"{steps.min():.2g}" + (f"..{steps.max():.2g}" if steps.max() > steps.min() + 1e-9
                                       else "") + " in log10"
    return f"{np.diff(ladder).min():g}"
