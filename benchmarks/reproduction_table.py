"""The transformer_proxies study as a reproduction table of Wortsman et al. 2023 (arXiv
2309.14322): per lr rung and setting of qk-layernorm and z-loss, the final validation loss (or
the failures), the largest attention logit, and per setting the LR sensitivity and the edge
(LR50) with their 95 % intervals, next to the direction the paper reports. Reads the study's
MLflow store; trains nothing.

    .venv/bin/python benchmarks/reproduction_table.py transformer_proxies --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from ablations.results import analysis, stability  # noqa: E402

# The direction the paper reports for each fix's effect (switching it on), per outcome:
# +1 higher, -1 lower, 0 no effect expected (sec. 3.1.1 qk-layernorm, 3.1.2 z-loss)
PAPER = {
    ("qk_layernorm", "peak_attn_logit"): -1,  # Fig. 1/4: logits grow with lr without it
    ("qk_layernorm", "lr_sensitivity"): -1,   # Fig. 1/4: flatter loss vs lr
    ("qk_layernorm", "edge_shift"): +1,       # stable at higher lr
    ("qk_layernorm", "unstable_rate"): -1,
    ("z_loss", "lr_sensitivity"): -1,         # Fig. 5/6: where output logits diverge
    ("z_loss", "edge_shift"): +1,
    ("z_loss", "unstable_rate"): -1,
    ("z_loss", "peak_attn_logit"): 0,         # not its mechanism
}
WORD = {1: "higher", -1: "lower", 0: "no effect"}


def verdict(expected: int, low: float, high: float) -> str:
    """Does the interval show the paper's direction?"""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not measured"
    if low > 0 or high < 0:
        seen = 1 if low > 0 else -1
        return "yes" if seen == expected else "opposite"
    return "consistent (none seen)" if expected == 0 else "no effect measured"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("study")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = ap.parse_args()
    runs = analysis.load_runs(args.study, args.tracking_uri)
    settings = [("off", "off"), ("off", "on"), ("on", "off"), ("on", "on")]

    def arm(g: pd.DataFrame) -> str:
        ok = g[g.status.isin(["converged", "recovered"])]
        fails = len(g) - len(ok)
        loss = f"{g.final_val_loss.median():.3f}" if g.final_val_loss.notna().any() else "-"
        peak = g.peak_attn_logit.median()
        return (f"{loss}" + (f" ({fails}/{len(g)} failed)" if fails else "")
                + f", {peak:.3g}")

    print(f"final val loss (median of {runs.seed.nunique()} seeds; failures = collapsed or "
          f"diverged), peak attention logit (median)\n")
    print("| lr | " + " | ".join(f"qk {q}, z {z}" for q, z in settings) + " |")
    print("|---" * 5 + "|")
    for lr, g in runs.groupby("lr"):
        cells = [arm(g[(g.qk_layernorm == (q == "on")) & (g.z_loss == (z == "on"))])
                 for q, z in settings]
        print(f"| {lr:g} | " + " | ".join(cells) + " |")
    lay = stability.layout(runs, ["qk_layernorm", "z_loss"], ["lr"])
    table = stability.recipe_table(runs, lay)
    lr50 = next(c for c in table.columns if c.startswith("LR50"))
    print("\n| setting | LR sensitivity [95% CI] | LR50 [95% CI] | max stable lr |")
    print("|---|---|---|---|")
    for _, r in table.iterrows():
        lrs = (f"{r.lr_sensitivity:.3f} [{r.lrs_low:.3f}, {r.lrs_high:.3f}]"
               if math.isfinite(r.lrs_low) else f"{r.lr_sensitivity:.3f}")
        print(f"| {r.recipe} | {lrs} | {r[lr50]} | {r.max_stable_lr:g} |")
    eff = stability.fix_effects(runs, lay)
    print("\n| fix | background | outcome | effect of switching it on [95% CI] | paper | matches |")
    print("|---|---|---|---|---|---|")
    for r in eff.itertuples():
        expected = PAPER[(r.fix, r.outcome)]
        print(f"| {r.fix} | {r.background} | {r.outcome} | {r.shown} | {WORD[expected]} | "
              f"{verdict(expected, float(r.low), float(r.high))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
