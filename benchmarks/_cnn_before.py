"""ChorusCNN: a small 1-D CNN that labels every frame of a song as verse (0) or chorus (1).

    x [B,T,F] -> (input pre-norm) -> conv stem -> n_blocks residual blocks -> linear -> [B,T,2]

Every toggle of the seed's broken and fixed code is a constructor argument:
  norm="batch"      BatchNorm1d, which needs [B,T,C] -> [B,C,T] transposes around it (broken)
  norm="layer"      LayerNorm over channels on [B,T,C], no transposes (fixed)
  residual_scale    x = f(x) + s * residual; 1.0 is the standard residual (fixed), 0.05/0.1 broken
  classifier_bias   initial [verse, chorus] bias; (0.02, 0.0) is the seed's verse-biased init
  input_norm        standardise each feature band over the valid frames of the window
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class ChannelNorm(nn.Module):
    """Normalisation over channels of a [B,T,C] tensor, either LayerNorm or BatchNorm1d."""

    def __init__(self, channels: int, kind: Literal["layer", "batch"]):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(channels) if kind == "layer" else nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        if self.kind == "layer":
            return self.norm(x)
        # BatchNorm1d wants channels second: [B,T,C] -> [B,C,T] -> norm -> [B,T,C].
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class TimeConv(nn.Module):
    """'Same'-padded Conv1d over time on [B,T,C] tensors."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C_in] -> [B, T, C_out]
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """conv -> norm -> ReLU -> dropout -> conv -> norm, then x = ReLU(f(x) + s * residual)."""

    def __init__(self, channels: int, kernel_size: int, dropout: float,
                 norm: Literal["layer", "batch"], residual_scale: float):
        super().__init__()
        self.conv1 = TimeConv(channels, channels, kernel_size)
        self.norm1 = ChannelNorm(channels, norm)
        self.conv2 = TimeConv(channels, channels, kernel_size)
        self.norm2 = ChannelNorm(channels, norm)
        self.dropout = nn.Dropout(dropout)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        residual = x
        h = self.dropout(F.relu(self.norm1(self.conv1(x))))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.residual_scale * residual)


def masked_standardize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise each feature over the valid frames of each window; padded frames become 0.

    x: [B, T, F], mask: [B, T]. A window with no valid frame stays 0 (count clamped to 1: no 0/0).
    """
    m = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1, 1]
    mean = (x * m).sum(dim=1, keepdim=True) / count  # [B, 1, F]
    var = (((x - mean) * m) ** 2).sum(dim=1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * m


class ChorusCNN(nn.Module):
    """Per-frame verse/chorus classifier. forward(x [B,T,F], mask [B,T]) -> logits [B,T,2]."""

    def __init__(self, n_features: int, hidden_dim: int = 48, n_blocks: int = 3,
                 kernel_size: int = 5, dropout: float = 0.1,
                 norm: Literal["layer", "batch"] = "layer", residual_scale: float = 1.0,
                 input_norm: bool = True, classifier_bias: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.input_norm = input_norm
        self.stem = TimeConv(n_features, hidden_dim, kernel_size)
        self.stem_norm = ChannelNorm(hidden_dim, norm)
        self.blocks = nn.ModuleList(
            ResidualBlock(hidden_dim, kernel_size, dropout, norm, residual_scale)
            for _ in range(n_blocks))
        self.classifier = nn.Linear(hidden_dim, 2)
        with torch.no_grad():
            self.classifier.bias.copy_(torch.tensor(classifier_bias, dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg) -> "ChorusCNN":  # cfg: model.config.TrainConfig
        return cls(cfg.n_features, cfg.hidden_dim, cfg.n_blocks, cfg.kernel_size, cfg.dropout,
                   cfg.norm, cfg.residual_scale, cfg.input_norm, cfg.classifier_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, F], mask: [B, T] (True = real frame)
        if self.input_norm:
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            x = masked_standardize(x, mask)
        h = F.relu(self.stem_norm(self.stem(x)))  # [B, T, H]
        for block in self.blocks:
            h = block(h)  # [B, T, H]
        return self.classifier(h)  # [B, T, 2]
