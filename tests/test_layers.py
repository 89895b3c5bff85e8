"""Each plain FAN layer against a naive implementation written from its formula (tests/naive.py)."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier

from fan.layers import ChannelAttention, DepthwiseConvMixer, DwConvMlp, FanBlock, OverlapPatchEmbed, SeMlp, TokenMixing
from fan.models.fan import LegacyLayerNorm, LegacyLayerNorm2d
from naive import (
    ATOL, layer_norm, naive_attention, naive_channel_attention, naive_dwconv_mlp, naive_mixer, naive_mixer_train,
    naive_se_mlp, randomize)

torch.manual_seed(0)
H, W, C, HEADS = 5, 6, 16, 4


@pytest.fixture
def tokens():
    return torch.randn(2, H * W, C)


@pytest.mark.parametrize('grid', [(H, W), (1, 1), (1, 4), (3, 2)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_depthwise_conv_mixer(grid):
    """conv1 -> GELU -> eval-mode BatchNorm -> conv2 on the token grid, grids of one row or column included."""
    mixer = randomize(DepthwiseConvMixer(C))
    rows, cols = grid
    tokens = torch.randn(2, rows * cols, C)
    out = mixer(tokens, rows, cols)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_mixer(tokens[b], mixer, rows, cols), atol=ATOL, rtol=ATOL)


def test_depthwise_conv_mixer_training_normalises_with_the_batch_statistics():
    """Training mode: BatchNorm on the batch's mean and biased variance, running statistics updated with momentum."""
    mixer = randomize(DepthwiseConvMixer(C)).train()
    tokens = torch.randn(2, H * W, C)
    running_mean = mixer.bn.running_mean.clone()
    out = mixer(tokens, H, W)
    expected, batch_mean, _ = naive_mixer_train(tokens, mixer, H, W, torch.ones(C))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mixer.bn.running_mean, 0.9 * running_mean + 0.1 * batch_mean)


@pytest.mark.parametrize('residual', [True, False])
def test_dwconv_mlp(tokens, residual):
    mlp = randomize(DwConvMlp(C, 3 * C, residual=residual))
    out = mlp(tokens, H, W)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_dwconv_mlp(tokens[b], mlp, H, W, residual), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('fused', [True, False])
def test_token_mixing(tokens, fused):
    """Values with SDPA (fused attention) and with the explicit matmuls."""
    attn = randomize(TokenMixing(C, num_heads=HEADS))
    attn.fused_attn = fused
    out = attn(tokens)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_attention(tokens[b], attn), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('residual', [True, False])
def test_channel_attention(tokens, residual):
    ca = randomize(ChannelAttention(C, 2 * C, num_heads=HEADS, mlp_residual=residual))
    out = ca(tokens, H, W)
    for b in range(2):
        torch.testing.assert_close(
            out[b], naive_channel_attention(tokens[b], ca, H, W, residual), atol=ATOL, rtol=ATOL)


def test_channel_gate_range(tokens):
    """Each softmax column sums to 1 and the key mean lies in [0, 1]: the sigmoid argument is within [min k, max k]."""
    ca = ChannelAttention(C, 4 * C, num_heads=HEADS).eval()
    gate = ca.channel_gate(tokens)
    assert gate.shape == (2, C)
    assert (gate > 0.5 - 1e-6).all() and (gate < 1 / (1 + math.exp(-1))).all()


@pytest.mark.parametrize('mixer', ['channel-attention', 'se'])
def test_fan_block(tokens, mixer):
    """x + gamma1 * attention(LN(x)), then + gamma2 * channel mixer(LN(x)); the mixer built as timm builds an MLP."""
    mlp_layer = partial(ChannelAttention, num_heads=HEADS) if mixer != 'se' else SeMlp
    naive_mlp = naive_channel_attention if mixer != 'se' else naive_se_mlp
    block = randomize(FanBlock(C, num_heads=HEADS, mlp_ratio=2., mlp_layer=mlp_layer))
    assert block.mlp.mlp_v.fc1.out_features == 2 * C
    out, h, w = block(tokens, H, W)
    assert (h, w) == (H, W)
    for b in range(2):
        x = tokens[b]
        x = x + block.gamma1 * naive_attention(layer_norm(x, block.norm1, 1e-6), block.attn)
        x = x + block.gamma2 * naive_mlp(layer_norm(x, block.norm2, 1e-6), block.mlp, H, W)
        torch.testing.assert_close(out[b], x, atol=ATOL, rtol=ATOL)


def test_se_mlp(tokens):
    mlp = randomize(SeMlp(C, 2 * C))
    out = mlp(tokens, H, W)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_se_mlp(tokens[b], mlp, H, W), atol=ATOL, rtol=ATOL)


def test_overlap_patch_embed(tokens):
    embed = randomize(OverlapPatchEmbed(C, 24))
    out, h, w = embed(tokens, H, W)
    assert (h, w) == (math.ceil(H / 2), math.ceil(W / 2))
    img = tokens[0].T.reshape(C, H, W)
    padded = F.pad(img, (1, 1, 1, 1))
    for i in range(h):
        for j in range(w):
            patch = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            value = (embed.proj.weight * patch).sum((1, 2, 3)) + embed.proj.bias
            expected = layer_norm(value, embed.norm, 1e-5)
            torch.testing.assert_close(out[0, i * w + j], expected, atol=ATOL, rtol=ATOL)



def test_legacy_layer_norm_2d_uses_unbiased_variance():
    norm = randomize(LegacyLayerNorm2d(8))
    x = torch.randn(2, 8, 3, 4)
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).sum(1, keepdim=True) / (8 - 1)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected, atol=ATOL, rtol=ATOL)


def test_legacy_layer_norm_channels_last_uses_unbiased_variance():
    norm = randomize(LegacyLayerNorm(8))
    x = torch.randn(2, 3, 4, 8)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / (8 - 1)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, atol=ATOL, rtol=ATOL)


def test_fourier_positional_encoding():
    """pos(y, x): 32 sin/cos channels per axis of 2*pi*n/(size + 1e-6) / 10000^(2*floor(i/2)/32), then a 1x1 conv."""
    pos = randomize(PositionalEncodingFourier(dim=C))
    Hp, Wp = 3, 5
    out = pos(2, Hp, Wp)
    features = torch.empty(64, Hp, Wp)
    for i in range(32):
        freq = 10000 ** (2 * (i // 2) / 32)
        trig = math.sin if i % 2 == 0 else math.cos
        for y in range(Hp):
            for x in range(Wp):
                features[i, y, x] = trig(2 * math.pi * (y + 1) / (Hp + 1e-6) / freq)
                features[32 + i, y, x] = trig(2 * math.pi * (x + 1) / (Wp + 1e-6) / freq)
    expected = torch.einsum('oc,chw->ohw', pos.token_projection.weight[:, :, 0, 0], features)
    expected = expected + pos.token_projection.bias[:, None, None]
    torch.testing.assert_close(out[1], expected, atol=1e-4, rtol=1e-4)


def test_class_attention_doubles_patch_tokens():
    """The class-attention block of the released models (tokens_norm=True) returns 2 * norm2(x + g1 * norm1(x)) for
    the patch tokens: the residual and the update share the patch part. The weights depend on it."""
    block = randomize(ClassAttentionBlock(C, num_heads=HEADS, qkv_bias=True, eta=1., tokens_norm=True))
    x = torch.randn(2, 7, C)
    out = block(x)
    n1 = layer_norm(x, block.norm1, 1e-5)
    patch = layer_norm(x[:, 1:] + block.gamma1 * n1[:, 1:], block.norm2, 1e-5)
    torch.testing.assert_close(out[:, 1:], 2 * patch, atol=ATOL, rtol=ATOL)
