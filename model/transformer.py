"""ChorusTransformer: a small pre-norm Transformer that labels every frame verse (0) / chorus (1).

    x [B,T,F] -> (input standardisation) -> Linear(F, d) + sinusoidal positions
      -> n_layers x [ x + MHSA(LN(x)) ; x + MLP(LN(x)) ] -> LN -> Linear(d, 2) -> [B,T,2]

Bidirectional self-attention (a frame tagger sees the whole window); padded keys are masked out.
The attention is written out (q k^T / sqrt(d_head), mask, softmax, @ v), not
F.scaled_dot_product_attention, because the pre-softmax logits are observed: every forward
stores `self.max_attn_logit`, a detached 0-dim tensor, the max over layers, heads and valid
(query, key) pairs of |q.k| / sqrt(d_head) -- the *absolute* value, so growth of either sign is
seen (in practice the large ones are the positive ones that make the softmax one-hot). It is a
tensor, never read on the host here, so it costs no device sync.

Stability levers of Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer
training instabilities", arXiv 2309.14322):
  qk_layernorm   LayerNorm (over d_head, shared by the heads) on queries and keys before the dot
                 product (Dehghani et al. 2023): bounds the attention logits whatever the scale of
                 W_q, W_k, so attention-logit growth (entropy collapse) cannot happen.
  z_loss         coef * mean over valid frames of log(Z)^2, Z = sum_c exp(logit_c) (PaLM; the
                 paper's sec. 3.1.2): keeps the output log-normaliser near 0.

Choices:
  positions   sinusoidal (Vaswani et al.), added after the input projection. No parameters, so
              nothing to tune or to grow at high lr (the ablation stays about attention), and any
              window length works: the table is built for `frames` and extended on the fly for a
              longer T; a shorter T uses its first T rows.
  init        every Linear weight ~ N(0, 0.02), biases 0, LayerNorm gain 1 / bias 0 (GPT-2 /
              BERT standard, no depth scaling).
  dropout     on the attention output and the MLP output before each residual add (0 = off).
Layout is [B,T,C] throughout; one fused qkv Linear per block.

Config fields read by `from_config` (by name, getattr with the defaults of TransformerShape):
  n_features, d_model, n_heads, n_layers, ffn_mult, dropout, qk_layernorm, input_norm, frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.cnn import masked_standardize

__all__ = ["ChorusTransformer", "TransformerShape", "z_loss", "sinusoidal_positions"]


@dataclass(frozen=True)
class TransformerShape:
    """The fields ChorusTransformer.from_config reads, with their defaults. A recipe's config
    dataclass carries fields of these names; any object with these attributes works."""

    n_features: int = 64
    """Feature bands per frame (input width)."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it (d_head = d_model / n_heads)."""
    n_layers: int = 2
    """Pre-LN Transformer blocks."""
    ffn_mult: int = 4
    """MLP hidden width = ffn_mult * d_model."""
    dropout: float = 0.0
    """Dropout on each block's attention and MLP output (before the residual add)."""
    qk_layernorm: bool = False
    """LayerNorm on queries and keys (per head, over d_head) before q.k."""
    input_norm: bool = True
    """Standardise each feature band over the valid frames of the window (as ChorusCNN)."""
    frames: int = 256
    """Window length T; the positional table is built for this many frames (longer T extends it)."""


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """[n, d] sin/cos positional encoding (Vaswani et al. 2017); odd d drops the last cos."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe


def z_loss(logits: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean over valid frames of log(Z)^2, Z = sum_c exp(logits_c). logits [B,T,C],
    mask [B,T] bool. An empty mask gives 0 (count clamped to 1)."""
    log_z = torch.logsumexp(logits.float(), dim=-1)  # [B, T]
    m = mask.to(log_z.dtype)
    return coef * (log_z.square() * m).sum() / m.sum().clamp_min(1.0)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention, written out so its logits can be observed."""

    def __init__(self, d_model: int, n_heads: int, qk_layernorm: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.q_norm = nn.LayerNorm(self.d_head) if qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.d_head) if qk_layernorm else None
        self.scale = 1.0 / math.sqrt(self.d_head)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor, valid_pairs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D]; key_bias [B,1,1,T] (0 valid, very negative padded); valid_pairs [B,1,T,T]
        bool. Returns the output [B,T,D] and the max |logit| over valid pairs (0-dim, detached)."""
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head)
        q, k, v = qkv.unbind(dim=2)  # each [B, T, H, dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, dh]
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, T, T]
        with torch.no_grad():
            peak = torch.where(valid_pairs, logits.detach().abs(), 0.0).amax()
        attn = torch.softmax(logits + key_bias, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)  # [B, T, D]
        return self.out(y), peak


class Block(nn.Module):
    """Pre-LN block: x + drop(MHSA(LN(x))), then x + drop(MLP(LN(x))), MLP = Linear-GELU-Linear."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float,
                 qk_layernorm: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, qk_layernorm)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_mult * d_model)
        self.fc2 = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor, valid_pairs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        a, peak = self.attn(self.ln1(x), key_bias, valid_pairs)
        x = x + self.dropout(a)
        x = x + self.dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))))
        return x, peak


class ChorusTransformer(nn.Module):
    """Per-frame verse/chorus Transformer. forward(x [B,T,F], mask [B,T]) -> logits [B,T,2];
    after each forward, `max_attn_logit` holds max |pre-softmax attention logit| (0-dim tensor)."""

    def __init__(self, n_features: int = 64, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2, ffn_mult: int = 4, dropout: float = 0.0,
                 qk_layernorm: bool = False, input_norm: bool = True, frames: int = 256):
        super().__init__()
        self.input_norm, self.qk_layernorm = input_norm, qk_layernorm
        self.d_model = d_model
        self.in_proj = nn.Linear(n_features, d_model)
        self.register_buffer("pos", sinusoidal_positions(frames, d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_mult, dropout, qk_layernorm)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)
        self.max_attn_logit = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights ~ N(0, 0.02), biases 0; LayerNorms gain 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg) -> "ChorusTransformer":
        """Reads n_features, d_model, n_heads, n_layers, ffn_mult, dropout, qk_layernorm,
        input_norm, frames by name; a missing field takes TransformerShape's default."""
        d = TransformerShape()
        return cls(**{f: getattr(cfg, f, getattr(d, f)) for f in (
            "n_features", "d_model", "n_heads", "n_layers", "ffn_mult", "dropout",
            "qk_layernorm", "input_norm", "frames")})

    def positions(self, t: int) -> torch.Tensor:
        if t <= self.pos.shape[0]:
            return self.pos[:t]
        return sinusoidal_positions(t, self.d_model).to(self.pos.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, F], mask: [B, T] (True = real frame)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.input_norm:
            x = masked_standardize(x, mask)
        h = self.in_proj(x) + self.positions(x.shape[1]).to(x.dtype)  # [B, T, D]
        # Padded keys get the dtype's most negative number (not -inf): a window with no valid
        # frame gives a uniform softmax, never NaN. Pairs with a padded query or key are
        # excluded from the logit peak.
        neg = torch.finfo(h.dtype).min
        key_bias = torch.zeros(mask.shape, dtype=torch.float32, device=x.device
                               ).masked_fill(~mask, neg)[:, None, None, :]  # [B, 1, 1, T]
        valid_pairs = (mask[:, :, None] & mask[:, None, :])[:, None]  # [B, 1, T, T]
        peaks = []
        for block in self.blocks:
            h, peak = block(h, key_bias, valid_pairs)
            peaks.append(peak)
        self.max_attn_logit = torch.stack(peaks).amax() if peaks else torch.zeros((), device=x.device)
        return self.head(self.ln_f(h))  # [B, T, 2]
