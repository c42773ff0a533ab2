"""The seed's fixes as named on/off toggles (see ../shared/SEED.md).

Each fix sets one or more TrainConfig fields; `before` is the broken recipe the authors started
from, `after` the fixed recipe (= TrainConfig defaults). A study factor named after a fix takes
the values off (before) and on (after).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import TrainConfig


@dataclass(frozen=True)
class Fix:
    name: str
    before: dict[str, Any]  # TrainConfig fields of the broken recipe
    after: dict[str, Any]  # TrainConfig fields of the fixed recipe
    claim: str  # the seed's claim, one line
    critical: bool = False  # the seed lists it among "the most critical fixes"
    kind: str = "fix"  # "fix" or "safeguard"

    def values(self, on: bool) -> dict[str, Any]:
        return dict(self.after if on else self.before)


FIXES: dict[str, Fix] = {f.name: f for f in [
    Fix("bias_init", {"classifier_bias": (0.02, 0.0)}, {"classifier_bias": (0.0, 0.0)},
        "A verse-biased classifier bias (0.02 vs 0.0) causes immediate instability; neutral zero "
        "bias fixes it.", critical=True),
    Fix("no_clamp", {"param_clamp": 0.5}, {"param_clamp": None},
        "Clamping every parameter to [-0.5, 0.5] destroys the initialisation; removing it lets "
        "training work.", critical=True),
    Fix("plain_residual", {"residual_scale": 0.1}, {"residual_scale": 1.0},
        "Scaling the residual path by 0.05/0.1 breaks residual learning; x = f(x) + residual "
        "fixes it.", critical=True),
    Fix("layer_norm", {"norm": "batch"}, {"norm": "layer"},
        "BatchNorm1d with transposes adds instability; LayerNorm suits sequence data better."),
    Fix("clip_0_5", {"grad_clip": 1.0}, {"grad_clip": 0.5},
        "The default gradient clipping (1.0) was insufficient; clipping at 0.5 stabilises."),
    Fix("low_lr", {"lr": 1e-3}, {"lr": 5e-4},
        "Learning rates in 1e-4..5e-4 (not 1e-3) are needed for CNN stability."),
    Fix("nan_zeroing", {"nonfinite": "stop"}, {"nonfinite": "zero"},
        "NaN detection with zeroing of non-finite gradients lets training recover.",
        critical=True, kind="safeguard"),
    Fix("input_norm", {"input_norm": False}, {"input_norm": True},
        "Input pre-normalisation keeps every component's input well-conditioned.",
        kind="safeguard"),
]}


def recipe(on: dict[str, bool] | None = None, baseline: str = "fixed") -> dict[str, Any]:
    """TrainConfig overrides for a combination of fixes.

    Fixes not named in `on` take their `baseline` state: "fixed" (after) or "broken" (before).
    """
    on = on or {}
    out: dict[str, Any] = {}
    for name, fix in FIXES.items():
        out.update(fix.values(on.get(name, baseline == "fixed")))
    return out


def check_consistent() -> None:
    """The fixed recipe must be TrainConfig's defaults (asserted by the tests)."""
    defaults = TrainConfig().to_dict()
    for fix in FIXES.values():
        for k, v in fix.after.items():
            want = list(v) if isinstance(v, tuple) else v
            if defaults[k] != want:
                raise AssertionError(f"fix {fix.name}: after {k}={v!r} but default is {defaults[k]!r}")


def table() -> str:
    """The fixes as a plain-text table for `runner.py fixes`."""
    def show(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in d.items())

    rows = [("fix", "kind", "before (broken)", "after (fixed)", "seed's claim")]
    for f in FIXES.values():
        rows.append((f.name + (" *" if f.critical else ""), f.kind, show(f.before), show(f.after),
                     f.claim))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 12)
    lines.append("\n* = among the seed's \"most critical fixes\"")
    return "\n".join(lines)
