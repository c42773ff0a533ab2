"""ChorusCNN numerics against hand-written references on tiny tensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from model.cnn import ChannelNorm, ChorusCNN, ResidualBlock, masked_standardize
from model.config import TrainConfig

B, T, C = 3, 7, 5  # T != C so that a wrong transpose cannot go unnoticed


def _randomise_affine(norm: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))


def test_batch_norm_path_normalises_each_channel_over_batch_and_time():
    """kind='batch' on [B,T,C] == hand-written per-channel BatchNorm over (B,T), and BatchNorm1d on the transpose."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen) * 3 + 1
    norm = ChannelNorm(C, "batch")
    _randomise_affine(norm.norm, gen)
    ref_bn = nn.BatchNorm1d(C)
    ref_bn.load_state_dict(norm.norm.state_dict())
    out = norm(x)

    mean = x.mean(dim=(0, 1))
    var = x.var(dim=(0, 1), unbiased=False)
    manual = (x - mean) / torch.sqrt(var + norm.norm.eps) * norm.norm.weight + norm.norm.bias
    assert out.shape == (B, T, C)
    assert_close(out, manual)
    assert_close(out, ref_bn(x.transpose(1, 2)).transpose(1, 2))
    # Running statistics are per channel (momentum 0.1 from 0 / 1).
    assert_close(norm.norm.running_mean, 0.1 * mean)


def test_batch_norm_path_eval_uses_running_stats():
    """In eval mode kind='batch' applies the running statistics per channel."""
    gen = torch.Generator().manual_seed(1)
    norm = ChannelNorm(C, "batch")
    with torch.no_grad():
        norm.norm.running_mean.copy_(torch.randn(C, generator=gen))
        norm.norm.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    norm.eval()
    x = torch.randn(B, T, C, generator=gen)
    bn = norm.norm
    manual = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    assert_close(norm(x), manual)


def test_layer_norm_path_normalises_over_channels():
    """kind='layer' == F.layer_norm over the last (channel) dim, and the hand-written formula."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, C, generator=gen) * 2 - 1
    norm = ChannelNorm(C, "layer")
    _randomise_affine(norm.norm, gen)
    out = norm(x)
    w, b, eps = norm.norm.weight, norm.norm.bias, norm.norm.eps
    assert_close(out, F.layer_norm(x, (C,), w, b, eps))
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    assert_close(out, (x - mean) / torch.sqrt(var + eps) * w + b)


def test_layer_norm_path_is_independent_across_batch():
    """LayerNorm output of one window does not depend on the other windows in the batch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, C, generator=gen)
    norm = ChannelNorm(C, "layer")
    assert_close(norm(x)[:1], norm(x[:1]))


@pytest.mark.parametrize("s", [1.0, 0.1])
@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_residual_block_matches_hand_composition(s, kind):
    """block(x) == relu(f(x) + s*x) with f built by hand from the block's submodules."""
    torch.manual_seed(0)
    block = ResidualBlock(C, kernel_size=3, dropout=0.5, norm=kind, residual_scale=s).eval()
    x = torch.randn(B, T, C)
    f = block.norm2(block.conv2(F.relu(block.norm1(block.conv1(x)))))
    assert_close(block(x), F.relu(f + s * x))


@pytest.mark.parametrize("s", [1.0, 0.1])
def test_residual_block_with_zero_branch_scales_identity(s):
    """With f(x) forced to 0 (zero convs, zero norm bias), block(x) == s * x for positive x."""
    block = ResidualBlock(C, kernel_size=3, dropout=0.0, norm="layer", residual_scale=s).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    x = torch.rand(B, T, C) + 0.1
    assert_close(block(x), s * x)


def test_time_conv_is_same_padded_over_time():
    """TimeConv keeps T and mixes only neighbouring frames (kernel 3: a delta moves by at most 1)."""
    conv = ChorusCNN(n_features=4, hidden_dim=6, n_blocks=0, kernel_size=3).stem
    x = torch.zeros(1, 9, 4)
    x[0, 4, 0] = 1.0
    out = conv(x) - conv(torch.zeros_like(x))
    assert out.shape == (1, 9, 6)
    touched = out.abs().sum(-1)[0] > 0
    assert touched.tolist() == [False, False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("bias", [(0.02, 0.0), (0.3, -0.7), (0.0, 0.0)])
def test_classifier_bias_init(bias):
    """The classifier bias starts as classifier_bias = [verse, chorus]."""
    torch.manual_seed(0)
    model = ChorusCNN.from_config(TrainConfig(n_features=4, hidden_dim=8, n_blocks=1,
                                              classifier_bias=bias))
    assert_close(model.classifier.bias.detach(), torch.tensor(bias))


def test_from_config_wires_norm_kind():
    """norm='batch' builds BatchNorm1d layers, norm='layer' LayerNorm layers."""
    kinds = {}
    for kind in ("batch", "layer"):
        model = ChorusCNN.from_config(TrainConfig(n_features=4, hidden_dim=8, n_blocks=2, norm=kind))
        kinds[kind] = {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))}
    assert kinds == {"batch": {nn.BatchNorm1d}, "layer": {nn.LayerNorm}}


def test_masked_standardize_stats_over_valid_frames():
    """Each band has zero mean and unit (population) std over valid frames; padded frames are 0."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 3, generator=gen) * torch.tensor([1.0, 5.0, 0.3]) + torch.tensor([2.0, -4.0, 10.0])
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    x[1, 5:] = 1000.0  # garbage on padded frames must not leak into the statistics
    out = masked_standardize(x, mask)
    for b in range(2):
        valid = out[b, mask[b]]
        assert_close(valid.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        assert_close(valid.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert torch.equal(out[1, 5:], torch.zeros(3, 3))


def test_masked_standardize_matches_reference():
    """Valid frames equal (x - mean) / sqrt(var + eps) computed on the valid frames alone."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 2, generator=gen)
    mask = torch.tensor([[True, True, False, True, True, False]])
    v = x[0, mask[0]]
    ref = (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5)
    assert_close(masked_standardize(x, mask)[0, mask[0]], ref)


def test_masked_standardize_fully_masked_window_is_zero_not_nan():
    """A window without any valid frame becomes all zeros (no 0/0 NaN)."""
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[False] * 4, [True] * 4])
    out = masked_standardize(x, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(4, 3))


def test_forward_output_shape():
    """ChorusCNN maps [B,T,F] (+ mask) to logits [B,T,2]."""
    model = ChorusCNN(n_features=6, hidden_dim=8, n_blocks=2, kernel_size=3)
    x, mask = torch.randn(3, 11, 6), torch.ones(3, 11, dtype=torch.bool)
    assert model(x, mask).shape == (3, 11, 2)
    assert model(x).shape == (3, 11, 2)


def test_forward_ignores_values_on_padded_frames():
    """With input_norm, what sits on padded frames does not change any output."""
    torch.manual_seed(0)
    model = ChorusCNN(n_features=4, hidden_dim=8, n_blocks=1, kernel_size=3).eval()
    x = torch.randn(2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    x2 = x.clone()
    x2[1, 6:] = 123.0
    assert_close(model(x, mask), model(x2, mask))
