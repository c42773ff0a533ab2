"""Reference points that show the task is not trivial: a constant guess and a context-free
per-frame linear classifier, scored on the same validation songs as the CNN."""

from __future__ import annotations

import numpy as np
import torch

from model.data import SongData
from model.metrics import FrameCounts


def _counts(pred: np.ndarray, y: np.ndarray) -> FrameCounts:
    return FrameCounts(tp=float((pred & (y == 1)).sum()), fp=float((pred & (y == 0)).sum()),
                       fn=float((~pred & (y == 1)).sum()), tn=float((~pred & (y == 0)).sum()))


def constant_chorus_f1(data: SongData) -> float:
    """F1 of predicting chorus for every validation frame (= 2p / (1 + p), p = chorus share)."""
    y = np.concatenate([s.labels for s in data.val])
    return _counts(np.ones_like(y, dtype=bool), y).f1()


def linear_frame_f1(data: SongData, epochs: int = 300, seed: int = 0) -> float:
    """Logistic regression on single frames (no context), trained full-batch with L-BFGS on the
    training songs; best decision threshold chosen on the training frames, F1 on validation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.concatenate([s.features for s in data.train]))  # [N, F]
    y = torch.from_numpy(np.concatenate([s.labels for s in data.train])).float()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    w = (torch.randn(x.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = (x @ w + b).numpy()
        ytr = y.numpy().astype(np.int64)
        # Threshold that maximises training F1 (generous to the baseline).
        best_t = max(np.quantile(scores, np.linspace(0.01, 0.99, 99)),
                     key=lambda t: _counts(scores > t, ytr).f1())
        xv = (torch.from_numpy(np.concatenate([s.features for s in data.val])) - mu) / sd
        yv = np.concatenate([s.labels for s in data.val])
        return _counts((xv @ w + b).numpy() > best_t, yv).f1()
