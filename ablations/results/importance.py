"""Search designs: importance and associations, never effects or verdicts.

In a search (TPE, random) the sampler chooses which cells run, so a factor's "on minus off" is
confounded with everything the sampler chose along with it (TPE turns a good fix on more often,
together with other good choices). What a search can say:

  * importance: Optuna's fANOVA (Hutter, Hoos & Leyton-Brown 2014): the share of the outcome's
    variance over the searched space that each factor explains, from a random forest fitted to
    the runs (one observation per run, i.e. per cell x seed, not per trial);
  * associations: the outcome per level of each factor (runs counted, spread over runs), and
    Spearman's rank correlation for numeric factors; descriptive only.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def _distribution(values: pd.Series):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    vals = values.dropna().unique()
    if len(vals) > 2 and all(isinstance(v, (int, float, np.integer, np.floating))
                             and not isinstance(v, (bool, np.bool_)) for v in vals):
        lo, hi = float(min(vals)), float(max(vals))
        return FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 10), float
    choices = sorted(vals.tolist(), key=str)
    conv = bool if all(isinstance(v, (bool, np.bool_)) for v in choices) else str
    return CategoricalDistribution([conv(c) for c in choices]), conv


def importance(runs: pd.DataFrame, factors: Sequence[str],
               outcome: str = "final_val_f1", seed: int = 0) -> pd.DataFrame:
    """fANOVA importance of each factor for `outcome` over the runs (sums to 1); empty with a
    `note` attribute when it cannot be computed (fewer than 2 distinct cells, constant outcome)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import create_trial

    ok = runs[np.isfinite(runs[outcome].to_numpy(float))]
    factors = [f for f in factors if f in ok and ok[f].nunique(dropna=True) > 1]
    empty = pd.DataFrame(columns=["factor", "importance"])
    if len(factors) == 0 or ok["cell"].nunique() < 2 or ok[outcome].nunique() < 2:
        empty.attrs["note"] = (f"importance not computed: {ok['cell'].nunique()} distinct cell(s), "
                               f"{ok[outcome].nunique()} distinct {outcome} value(s)")
        return empty
    dists = {f: _distribution(ok[f]) for f in factors}
    study = optuna.create_study(direction="maximize")
    for _, r in ok.iterrows():
        study.add_trial(create_trial(params={f: dists[f][1](r[f]) for f in factors},
                                     distributions={f: dists[f][0] for f in factors},
                                     value=float(r[outcome])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed),
                                    normalize=True)
    out = pd.DataFrame({"factor": list(imp), "importance": list(imp.values())})
    out.attrs["note"] = (f"fANOVA (Optuna) over {len(ok)} runs in {ok['cell'].nunique()} cells "
                         f"({outcome})")
    return out


def associations(runs: pd.DataFrame, factors: Sequence[str],
                 outcome: str = "final_val_f1") -> pd.DataFrame:
    """Per factor and level: runs, mean and sd of the outcome over runs, divergence and collapse
    counts; numeric factors with more than two values get Spearman's rho instead."""
    rows = []
    for f in factors:
        vals = runs[f].dropna()
        numeric = vals.nunique() > 2 and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            for v in vals.unique())
        if numeric:
            y = runs[outcome].to_numpy(float)
            ok = np.isfinite(y) & runs[f].notna().to_numpy()
            rho, p = stats.spearmanr(runs.loc[ok, f], y[ok]) if ok.sum() > 2 else (math.nan, math.nan)
            rows.append({"factor": f, "level": f"{vals.min():g}..{vals.max():g} (Spearman rho)",
                         "runs": int(ok.sum()), "mean": float(rho), "sd": math.nan,
                         "diverged": f"{int(runs.loc[ok, 'diverged'].sum())}/{int(ok.sum())}",
                         "collapsed": f"{int(runs.loc[ok, 'collapsed'].sum())}/{int(ok.sum())}",
                         "p": float(p)})
            continue
        for level in sorted(vals.unique(), key=str):
            sel = runs[runs[f] == level]
            label = ("on" if level else "off") if isinstance(level, (bool, np.bool_)) else str(level)
            rows.append({"factor": f, "level": label, "runs": len(sel),
                         "mean": float(sel[outcome].mean()),
                         "sd": float(sel[outcome].std()) if len(sel) > 1 else math.nan,
                         "diverged": f"{int(sel['diverged'].sum())}/{len(sel)}",
                         "collapsed": f"{int(sel['collapsed'].sum())}/{len(sel)}", "p": math.nan})
    return pd.DataFrame(rows)
