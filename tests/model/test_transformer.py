"""ChorusTransformer on tiny tensors: shapes, masking, qk-layernorm, z-loss, the logit peak."""

import math

import torch
from torch.testing import assert_close

from model.transformer import ChorusTransformer, TransformerShape, z_loss

B, T, F_ = 3, 9, 6


def _model(**kw) -> ChorusTransformer:
    torch.manual_seed(0)
    args = dict(n_features=F_, d_model=16, n_heads=4, n_layers=2, ffn_mult=2, frames=T)
    args.update(kw)
    return ChorusTransformer(**args).eval()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, F_, generator=gen) * 2 + 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # a padded window
    mask[2, 3:] = False
    return x, mask


def test_output_shape_and_peak_is_a_detached_scalar():
    m = _model()
    x, mask = _batch()
    out = m(x, mask)
    assert out.shape == (B, T, 2)
    assert m.max_attn_logit.shape == () and not m.max_attn_logit.requires_grad
    out2 = m(x[:, :4], mask[:, :4])  # T shorter than frames
    assert out2.shape == (B, 4, 2)
    assert m(torch.randn(1, 2 * T, F_)).shape == (1, 2 * T, 2)  # longer than the table


def test_from_config_reads_fields_by_name():
    cfg = TransformerShape(n_features=F_, d_model=8, n_heads=2, n_layers=3, ffn_mult=3,
                           qk_layernorm=True, frames=5)
    m = ChorusTransformer.from_config(cfg)
    assert len(m.blocks) == 3 and m.blocks[0].fc1.out_features == 24
    assert m.blocks[0].attn.q_norm is not None and m.pos.shape == (5, 8)


def test_deterministic_for_a_seed():
    x, mask = _batch()
    assert_close(_model()(x, mask), _model()(x, mask), rtol=0, atol=0)


def test_padded_frames_do_not_affect_valid_outputs():
    for input_norm in (True, False):
        m = _model(input_norm=input_norm)
        x, mask = _batch()
        out = m(x, mask)
        peak = m.max_attn_logit
        x2 = x.clone()
        x2[~mask] = torch.randn(int((~mask).sum()), F_) * 100  # garbage in the padding
        out2 = m(x2, mask)
        assert_close(out2[mask], out[mask])
        assert_close(m.max_attn_logit, peak)  # padded queries and keys are not in the peak
        # and a padded window equals its unpadded prefix alone
        n = int(mask[2].sum())
        assert_close(m(x[2:3, :n], mask[2:3, :n])[0], out[2, :n], rtol=1e-5, atol=1e-5)


def _brute_force_peak(m: ChorusTransformer, x, mask) -> torch.Tensor:
    """max |q.k|/sqrt(dh) over layers, heads and valid pairs, recomputed loop by loop."""
    best = torch.tensor(0.0)
    hooks, inputs = [], []
    for blk in m.blocks:
        hooks.append(blk.attn.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0]))))
    m(x, mask)
    for h in hooks:
        h.remove()
    for attn, h in inputs:
        dh = attn.d_head
        q, k, _ = attn.qkv(h).split(h.shape[-1], dim=-1)
        for b in range(x.shape[0]):
            for head in range(attn.n_heads):
                qh = q[b, :, head * dh:(head + 1) * dh]
                kh = k[b, :, head * dh:(head + 1) * dh]
                if attn.q_norm is not None:
                    qh, kh = attn.q_norm(qh), attn.k_norm(kh)
                for i in range(x.shape[1]):
                    for j in range(x.shape[1]):
                        if mask[b, i] and mask[b, j]:
                            best = torch.maximum(best, (qh[i] @ kh[j]).abs() / math.sqrt(dh))
    return best


def test_max_attn_logit_matches_brute_force():
    for qk in (False, True):
        m = _model(qk_layernorm=qk)
        with torch.no_grad():
            for blk in m.blocks:
                blk.attn.qkv.weight.mul_(20)  # logits well away from 0
        x, mask = _batch(1)
        with torch.no_grad():
            m(x, mask)
            got = m.max_attn_logit.clone()
            assert_close(got, _brute_force_peak(m, x, mask), rtol=1e-4, atol=1e-5)


def test_qk_layernorm_bounds_the_logits():
    x, mask = _batch(2)
    peaks = {}
    for qk in (False, True):
        m = _model(qk_layernorm=qk)
        with torch.no_grad():
            m(x, mask)
            before = float(m.max_attn_logit)
            d = m.d_model
            for blk in m.blocks:
                blk.attn.qkv.weight[: 2 * d].mul_(100)  # W_q and W_k
            m(x, mask)
            peaks[qk] = (before, float(m.max_attn_logit))
    off, on = peaks[False], peaks[True]
    assert off[1] > 1000 * off[0] and off[1] > 10
    # with qk-LN, |q.k|/sqrt(dh) <= |q||k|/sqrt(dh) = dh/sqrt(dh) = sqrt(dh) (gain 1, bias 0)
    assert on[1] <= math.sqrt(m.blocks[0].attn.d_head) + 1e-4
    assert math.isclose(on[0], on[1], rel_tol=1e-2)  # scale-invariant up to LayerNorm's eps


def test_z_loss_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [5.0, -5.0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, True, False]])
    lz = [math.log(2.0), math.log(math.e + math.e ** 2)]
    want = 1e-2 * (lz[0] ** 2 + lz[1] ** 2) / 2
    assert math.isclose(float(z_loss(logits, mask, 1e-2)), want, rel_tol=1e-6)
    assert float(z_loss(logits, torch.zeros(1, 3, dtype=torch.bool), 1.0)) == 0.0


def test_gradients_flow_and_are_finite():
    m = _model(qk_layernorm=True).train()
    x, mask = _batch()
    out = m(x, mask)
    (out.square().mean() + z_loss(out, mask, 1e-4)).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
