"""The `chorus_cnn` recipe: the seed's 1-D CNN chorus detector (model/cnn.py) on songs
(model/data.py), with the seed's fixes (../shared/SEED.md) as on/off toggles. Its config is
TrainConfig, whose defaults are the seed's fixed recipe; `before` is the broken recipe its
authors started from. This is the runner's default recipe."""

from __future__ import annotations

from model.config import TrainConfig
from model.recipe import Fix, Recipe

FIXES = (
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
)


def _data(cfg: TrainConfig):
    from model.data import make_data
    return make_data(cfg)


def _model(cfg: TrainConfig, n_features: int):
    import dataclasses

    from model.cnn import ChorusCNN
    cfg = dataclasses.replace(cfg, n_features=n_features) if n_features != cfg.n_features else cfg
    return ChorusCNN.from_config(cfg)


RECIPE = Recipe(
    name="chorus_cnn", config=TrainConfig, fixes=FIXES, make_data=_data, build_model=_model,
    description="The seed's 1-D CNN that labels each frame of a song verse or chorus; its "
                "authors' eight fixes (../shared/SEED.md).")
