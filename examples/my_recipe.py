"""A tiny MLP whose authors applied two fixes: which one mattered?"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.config import LoopConfig
from model.data import SongData
from model.recipe import Fix, Recipe


@dataclass(frozen=True)
class MLPConfig(LoopConfig):      # the shared loop's knobs (lr, precision, clipping, ...) + yours
    hidden: int = 32
    init_std: float = 0.1         # fixed recipe = the defaults
    standardize: bool = True
    frames: int = 1               # one example per window
    epochs: int = 3
    steps_per_epoch: int = 25


def make_data(cfg: MLPConfig) -> SongData:
    rng = np.random.default_rng(0)
    x = rng.normal(20.0, 50.0, size=(600, 8)).astype(np.float32)   # raw, badly scaled features
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    return SongData.from_arrays(x[:450], y[:450], x[450:], y[450:])


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, n_features: int):
        super().__init__()
        self.standardize = cfg.standardize
        self.net = nn.Sequential(nn.Linear(n_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 2))
        for p in self.net.parameters():
            nn.init.normal_(p, std=cfg.init_std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B,T,F] -> [B,T,2]
        if self.standardize:
            x = (x - 20.0) / 50.0
        return self.net(x)


RECIPE = Recipe(
    name="tiny_mlp", config=MLPConfig, make_data=make_data, build_model=MLP,
    fixes=(Fix("small_init", {"init_std": 3.0}, {"init_std": 0.1}, "A wide init blows up."),
           Fix("standardize", {"standardize": False}, {"standardize": True},
               "Raw features make the first layer's steps far too large.")))
