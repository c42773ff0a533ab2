"""Frame-level metrics: masked loss, chorus F1, chorus%, accuracy, collapse detection.

Counts are accumulated as tensors and read once per validation pass (one device sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The seed's symptom was chorus%=0.00: a model that predicts one class for (almost) every frame.
COLLAPSE_BELOW_PCT = 1.0
COLLAPSE_ABOVE_PCT = 99.0


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over valid frames. logits [B,T,2], y [B,T], mask [B,T].

    An empty mask gives 0 (the count is clamped to 1), never 0/0 = NaN.
    """
    per_frame = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none")  # [B*T]
    m = mask.reshape(-1).to(per_frame.dtype)
    return (per_frame * m).sum() / m.sum().clamp_min(1.0)


def predicted_chorus(logits: torch.Tensor) -> torch.Tensor:
    """[B,T,2] -> [B,T] bool. A NaN logit compares False: a NaN model predicts no chorus."""
    return logits[..., 1] > logits[..., 0]


@dataclass
class FrameCounts:
    """Confusion counts of chorus (positive) vs rest over valid frames, plus summed loss."""

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0
    loss_sum: float = 0.0

    @property
    def frames(self) -> float:
        return self.tp + self.fp + self.fn + self.tn

    def f1(self) -> float:
        """Chorus F1; NaN where there is no chorus frame to find (F1 is undefined there)."""
        if self.tp + self.fn == 0:
            return float("nan")
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)

    def chorus_pct(self) -> float:
        return 100.0 * (self.tp + self.fp) / self.frames if self.frames else float("nan")

    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.frames if self.frames else float("nan")

    def loss(self) -> float:
        return self.loss_sum / self.frames if self.frames else float("nan")


def count_frames(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-batch [tp, fp, fn, tn, loss_sum] as one tensor, to be summed on device."""
    pred = predicted_chorus(logits) & mask
    true = (y == 1) & mask
    per_frame = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), reduction="none")
    loss_sum = (per_frame * mask.reshape(-1).to(per_frame.dtype)).sum()
    counts = torch.stack([(pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum(),
                          (~pred & ~true & mask).sum()]).to(loss_sum.dtype)
    return torch.cat([counts, loss_sum.reshape(1)])


def is_collapsed(chorus_pct: float, true_chorus_pct: float = 50.0) -> bool:
    """Predicting (almost) one class everywhere where the truth has both: chorus% below 1 % while
    at least 1 % of the frames are chorus, or above 99 % while at most 99 % are. Predicting no
    chorus on songs without chorus is right, not a collapse. NaN (no valid frame or NaN logits)
    is not collapse."""
    if math.isnan(chorus_pct):
        return False
    truth = 50.0 if math.isnan(true_chorus_pct) else true_chorus_pct
    return ((chorus_pct < COLLAPSE_BELOW_PCT <= truth) or
            (chorus_pct > COLLAPSE_ABOVE_PCT >= truth))
