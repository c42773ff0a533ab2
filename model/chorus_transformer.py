"""The `chorus_transformer` recipe: a small pre-norm Transformer frame tagger (model/transformer.py)
on the same songs as the chorus CNN, with the stability interventions of Wortsman et al. 2023,
"Small-scale proxies for large-scale Transformer training instabilities" (arXiv 2309.14322), as
its fixes. Its defaults are the fixed recipe (every intervention on); `before` is the setting the
paper starts from. It is the runner's check against a published answer (studies/
transformer_proxies.yaml, README "A known answer")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from model.config import ConfigError, SongsConfig
from model.recipe import Fix, Recipe


@dataclass(frozen=True)
class TransformerConfig(SongsConfig):
    """One training run of the chorus Transformer. Defaults: the fixed recipe."""

    # ---- network ----------------------------------------------------------------------
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible by it)."""
    n_layers: int = 2
    """Pre-LN Transformer blocks."""
    ffn_mult: int = 4
    """MLP hidden width = ffn_mult x d_model."""
    dropout: float = 0.0
    """Dropout on each block's attention and MLP output."""
    qk_layernorm: bool = True
    """LayerNorm on queries and keys before their dot product (Dehghani et al. 2023)."""
    z_loss: float = 1e-4
    """Coefficient of the z-loss, coef x mean log(Z)^2 over valid frames (0 = off)."""

    # ---- the shared loop's defaults: the paper's optimizer, at a CPU scale -----------
    # (100 steps of 16 windows of 256 frames; benchmarks/transformer_proxies_probe.py measured it)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    weight_decay_mode: Literal["coupled", "independent"] = "independent"
    adam_eps: float = 1e-15
    adam_beta2: float = 0.95
    warmup_steps: int = 10
    grad_clip: Optional[float] = 1.0
    nonfinite: Literal["stop", "skip", "zero", "rollback"] = "stop"
    epochs: int = 2
    steps_per_epoch: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_model", "n_heads", "n_layers", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: must divide d_model ({self.d_model}), got {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0.0, 1.0), got {self.dropout!r}")
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0):
            raise ConfigError(f"z_loss: must be a finite number >= 0 (0 = off), got {self.z_loss!r}")


FIXES = (
    Fix("qk_layernorm", {"qk_layernorm": False}, {"qk_layernorm": True},
        "Without qk-layernorm, attention logits grow at high learning rates until the softmax is "
        "one-hot (attention entropy collapse) and the loss diverges; qk-layernorm removes it, "
        "flattening loss vs lr (lower LR sensitivity) (Wortsman et al. 2023 sec. 3.1.1).",
        critical=True),
    Fix("z_loss", {"z_loss": 0.0}, {"z_loss": 1e-4},
        "Output logits drift to large negative values until the loss diverges (output-logit "
        "divergence); a z-loss of 1e-4 on log Z mitigates it (sec. 3.1.2).", critical=True),
    Fix("warmup", {"warmup_steps": 0}, {"warmup_steps": 10},
        "Longer warmup lowers LR sensitivity, above all for larger models (sec. 3.2.1)."),
    Fix("small_eps", {"adam_eps": 1e-8}, {"adam_eps": 1e-15},
        "AdamW's default eps 1e-8 dominates the update once gradient RMS falls below it, shrinking "
        "updates; eps 1e-15 restores them and lowers LR sensitivity at scale (sec. 3.4)."),
    Fix("independent_wd", {"weight_decay_mode": "coupled", "weight_decay": 0.1},
        {"weight_decay_mode": "independent", "weight_decay": 1e-4},
        "Weight decay independent of the lr (1e-4 per step, not lr x 0.1) lowers LR sensitivity "
        "(sec. 3.2.2)."),
)


def _data(cfg: TransformerConfig):
    from model.data import make_data
    return make_data(cfg)


def _model(cfg: TransformerConfig, n_features: int):
    import dataclasses

    from model.transformer import ChorusTransformer
    cfg = dataclasses.replace(cfg, n_features=n_features) if n_features != cfg.n_features else cfg
    return ChorusTransformer.from_config(cfg)


def _loss(cfg: TransformerConfig):
    from model.metrics import masked_cross_entropy
    from model.transformer import z_loss

    if cfg.z_loss == 0:
        return masked_cross_entropy

    def cross_entropy_z_loss(logits, y, mask):
        return masked_cross_entropy(logits, y, mask) + z_loss(logits, mask, cfg.z_loss)
    return cross_entropy_z_loss


RECIPE = Recipe(
    name="chorus_transformer", config=TransformerConfig, fixes=FIXES, make_data=_data,
    build_model=_model, loss=_loss, curves={"attn_logit": "max_attn_logit"},
    description="A small pre-norm Transformer frame tagger on the same songs; the stability "
                "interventions of Wortsman et al. 2023 (qk-layernorm, z-loss, warmup, AdamW eps, "
                "independent weight decay).")
