"""Each FAN layer against a naive implementation written from its formula (explicit loops, no shared code)."""
import copy
import math
import os
import pickle
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import timm.models.convnext
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier

import fan.layers
from fan.layers import (
    ChannelAttention, DepthwiseConv2d, DepthwiseConvMixer, DwConvMlp, FanBlock, Linear, OverlapPatchEmbed, SeMlp,
    TokenChunkedMlp, TokenMixing, use_fan_linear)
from fan.models.fan import ConvNeXtBlock, ConvStem, LegacyLayerNorm, LegacyLayerNorm2d
from fan.models.fan_swin import FanSwinBlock, SwinBlock, WindowAttention

torch.manual_seed(0)
ATOL = 1e-5


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random values for every parameter and BN statistic, so that no init value (ones, zeros) hides a mistake."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith('running_var')
                        else 0.5 * torch.randn(t.shape, generator=g))
    return module.eval()


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, layer, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * layer.weight + layer.bias


def depthwise_conv(img, weight, bias):
    """img (C, H, W), weight (C, 1, k, k), k odd, zero padding k // 2:
    out[c, i, j] = bias[c] + sum_{u,v} weight[c, 0, u, v] img[c, i + u - k // 2, j + v - k // 2]."""
    C, H, W = img.shape
    k = weight.shape[-1]
    padded = F.pad(img, (k // 2,) * 4)
    out = bias[:, None, None].expand(C, H, W).clone()
    for u in range(k):
        for v in range(k):
            out = out + weight[:, 0, u, v][:, None, None] * padded[:, u:u + H, v:v + W]
    return out


def naive_mixer(tokens, mixer, H, W):
    """tokens (N, C) of one image -> dwconv -> GELU -> BN (eval) -> dwconv -> (N, C)."""
    img = tokens.T.reshape(-1, H, W)
    y = gelu(depthwise_conv(img, mixer.conv1.weight, mixer.conv1.bias))
    bn = mixer.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return depthwise_conv(y, mixer.conv2.weight, mixer.conv2.bias).reshape(img.shape[0], -1).T


def naive_dwconv_mlp(tokens, mlp, H, W, residual=True):
    y = linear(tokens, mlp.fc1)
    mixed = mlp.gamma * naive_mixer(y, mlp.dwconv, H, W)
    return linear(y + mixed if residual else mixed, mlp.fc2)


def naive_channel_attention(tokens, ca, H, W, residual=True):
    """Per head h and channel c: A = sigmoid(sum_n softmax_n(q)[n, c] * mean_c' softmax_n(x)[n, c']) * t[h]."""
    N, C = tokens.shape
    heads = ca.num_heads
    d = C // heads
    q = linear(tokens, ca.q)
    gate = torch.empty(C)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        q_soft = torch.exp(q[:, cols]) / torch.exp(q[:, cols]).sum(0, keepdim=True)  # softmax over tokens
        k_soft = torch.exp(tokens[:, cols]) / torch.exp(tokens[:, cols]).sum(0, keepdim=True)
        k_mean = k_soft.mean(1)  # (N,)
        for c in range(d):
            gate[h * d + c] = torch.sigmoid((q_soft[:, c] * k_mean).sum()) * ca.temperature[h, 0, 0]
    v = layer_norm(naive_dwconv_mlp(tokens, ca.mlp_v, H, W, residual), ca.norm_v, 1e-5)
    return v * gate


def naive_attention(tokens, attn):
    N, C = tokens.shape
    heads = attn.num_heads
    d = C // heads
    q = linear(tokens, attn.q)
    kv = linear(tokens, attn.kv)
    k, v = kv[:, :C], kv[:, C:]
    out = torch.empty(N, C)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(d)
        weights = torch.exp(logits - logits.max(1, keepdim=True).values)
        weights = weights / weights.sum(1, keepdim=True)
        out[:, cols] = weights @ v[:, cols]
    return linear(out, attn.proj)


@pytest.mark.parametrize('frozen', [(), ('weight',), ('input',)], ids=['all-trained', 'frozen-weight', 'frozen-input'])
@pytest.mark.parametrize('features', [(16, 24), (24, 16)], ids=['widening', 'narrowing'])
def test_linear_fast_paths_match_the_formula(frozen, features):
    """fan's Linear (oneDNN's product with the bias in its epilogue on the CPU): inference values, and in training
    the values and every gradient asked for, against x @ W.T + b, and with an output scale s (folded into the
    weights) against (x @ W.T + b) * s; the weight gradient is taken in either orientation."""
    layer = randomize(Linear(*features))
    tokens, out_scale = torch.randn(2, 7, features[0]), torch.randn(features[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens), linear(tokens, layer), atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(layer(tokens, out_scale), linear(tokens, layer) * out_scale, atol=ATOL, rtol=ATOL)
    layer.weight.requires_grad_('weight' not in frozen)
    for scale in (None, out_scale.clone().requires_grad_()):
        x = tokens.clone().requires_grad_('input' not in frozen)
        out = layer(x, scale)
        if fan.layers._MKLDNN_LINEAR:
            assert 'OneDnnLinearBackward' in autograd_nodes(out.grad_fn)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        ours = [x.grad, layer.weight.grad, layer.bias.grad, None if scale is None else scale.grad]
        layer.weight.grad = layer.bias.grad = None
        x_ref = tokens.clone().requires_grad_('input' not in frozen)
        scale_ref = None if scale is None else out_scale.clone().requires_grad_()
        expected = linear(x_ref, layer) if scale is None else linear(x_ref, layer) * scale_ref
        expected.backward(grad_out)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
        wanted = [x_ref.grad, layer.weight.grad, layer.bias.grad, None if scale is None else scale_ref.grad]
        assert_same_gradients(ours, wanted)
        layer.weight.grad = layer.bias.grad = None


def test_linear_input_gradient_of_a_broadcast_output_gradient():
    """``out.sum().backward()`` hands the linear an expanded (stride-0) output gradient: its input gradient through
    oneDNN's product equals the formula's, ones @ W."""
    layer = randomize(Linear(16, 24))
    x = torch.randn(2, 7, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 7, 16), atol=ATOL, rtol=ATOL)


@pytest.mark.skipif(not fan.layers._MKLDNN_LINEAR, reason='no oneDNN linear in this build of torch')
def test_bf16_linear_reuses_its_packed_weight_until_the_weights_or_scale_change():
    """bfloat16 inference packs the weight once: the next call reuses it; an in-place update of the weight, the bias
    or the ``out_scale`` parameter, or a scale made per call, gives the new formula's values; ``train()`` drops the
    packed weight; copies and pickles of the layer carry none."""
    g = torch.Generator().manual_seed(0)
    layer, x = randomize(Linear(16, 24)), torch.randn(2, 7, 16, generator=g)
    scale = torch.nn.Parameter(torch.rand(24, generator=g) + 0.5)

    def bf16_inference(out_scale=None):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return layer(x, out_scale)

    assert_close_in_bf16(bf16_inference(), linear(x, layer))
    packed = fan.layers._PACKED_BF16_WEIGHTS[layer][2]
    bf16_inference()
    assert fan.layers._PACKED_BF16_WEIGHTS[layer][2] is packed
    with torch.no_grad():
        layer.weight.mul_(-2)
        assert_close_in_bf16(bf16_inference(), linear(x, layer))
        layer.bias.add_(3)
        assert_close_in_bf16(bf16_inference(), linear(x, layer))
        assert_close_in_bf16(bf16_inference(scale), linear(x, layer) * scale)
        scale.mul_(2)
        assert_close_in_bf16(bf16_inference(scale), linear(x, layer) * scale)
        assert_close_in_bf16(bf16_inference(scale * 3), linear(x, layer) * scale * 3)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied not in fan.layers._PACKED_BF16_WEIGHTS
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            assert_close_in_bf16(copied(x), linear(x, layer))
    layer.train()
    assert layer not in fan.layers._PACKED_BF16_WEIGHTS


H, W, C, HEADS = 5, 6, 16, 4


@pytest.fixture
def tokens():
    return torch.randn(2, H * W, C)


@pytest.mark.parametrize('add_input', [True, False], ids=['plus-input', 'mixer-only'])
@pytest.mark.parametrize('grid', [(H, W), (1, 1), (1, 4), (3, 2)], ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('autograd', [True, False], ids=['reference', 'onednn-inference'])
def test_depthwise_conv_mixer(autograd, grid, add_input):
    """Values with a per-channel output scale, with and without the input added. Without autograd, CPU inference
    folds the BatchNorm into conv2 and takes back the shift's taps on the zero padding: grids of one row or column
    have every border."""
    mixer = randomize(DepthwiseConvMixer(C))
    rows, cols = grid
    tokens, scale = torch.randn(2, rows * cols, C), torch.randn(C)
    with torch.set_grad_enabled(autograd):
        out = mixer(tokens.clone(), rows, cols, scale=scale, add_input=add_input)  # inference adds to it in place
        assert mixer._inference_dtype(tokens) == (torch.float32 if fan.layers._MKLDNN_CONV and not autograd else None)
    for b in range(2):
        expected = scale * naive_mixer(tokens[b], mixer, rows, cols)
        torch.testing.assert_close(out[b], tokens[b] + expected if add_input else expected, atol=ATOL, rtol=ATOL)


def assert_same_gradients(ours, wanted) -> None:
    """Each gradient asked for (None where not) equals the formula's, to 1e-4."""
    for got, want in zip(ours, wanted, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def autograd_nodes(root) -> set:
    """Type names of every node in the autograd graph behind ``root``."""
    names, seen, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            names.add(type(node).__name__)
            stack.extend(child for child, _ in node.next_functions)
    return names


def naive_mixer_train(tokens, mixer, H, W, scale):
    """Training mode on a batch (B, N, C): BatchNorm on the batch's mean and biased variance per channel."""
    img = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, H, W)
    y = torch.stack([gelu(depthwise_conv(i, mixer.conv1.weight, mixer.conv1.bias)) for i in img])
    mean = y.mean((0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean((0, 2, 3), keepdim=True)
    bn = mixer.bn
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    out = torch.stack([depthwise_conv(i, mixer.conv2.weight, mixer.conv2.bias) for i in y]) * scale[:, None, None]
    return out.flatten(2).transpose(1, 2), mean.flatten(), var.flatten() * y[:, 0].numel() / (y[:, 0].numel() - 1)


@pytest.mark.parametrize(
    'frozen', [(), ('bn.weight', 'bn.bias', 'conv2.weight'), ('input', 'conv1.weight', 'conv1.bias')],
    ids=['all-trained', 'frozen-norm-and-conv2', 'frozen-input-side'])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('grid', [(H, W), (1, 4), (3, 2)], ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('add_input', [True, False], ids=['plus-input', 'mixer-only'])
@pytest.mark.parametrize('keep_conv1', [True, False], ids=['conv1-kept', 'conv1-recomputed'])
def test_depthwise_conv_mixer_training_recomputes_the_same_values_and_gradients(
        frozen, momentum, grid, add_input, keep_conv1, monkeypatch):
    """Training keeps only conv1's input and output, recomputes GELU and norm in the backward pass, reusing its maps
    in place, and takes the convs' input gradients as convs with flipped kernels: outputs, every gradient asked for
    and the running statistics (updated once; momentum None is the plain average) must equal plain autograd on the
    formula, also when only some inputs need gradients, on grids of one row (every pixel on a border), with the
    input added to the output (its gradient taking the output gradient in place), and when conv1's output is
    recomputed in the backward pass (``RECOMPUTE_CONV_BYTES``) instead of kept."""
    if not keep_conv1:
        monkeypatch.setattr(fan.layers, 'RECOMPUTE_CONV_BYTES', 0)
    H, W = grid
    tokens = torch.randn(2, H * W, C)
    mixer = randomize(DepthwiseConvMixer(C)).train()
    mixer.bn.momentum = momentum
    for name, p in mixer.named_parameters():
        p.requires_grad_(name not in frozen)
    scale = torch.randn(C, requires_grad=True)
    running_mean, running_var = mixer.bn.running_mean.clone(), mixer.bn.running_var.clone()
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = mixer(x, H, W, scale=scale, add_input=add_input)
    assert 'ConvGeluNormConvBackward' in autograd_nodes(out.grad_fn)
    assert 'AddBackward0' not in autograd_nodes(out.grad_fn)  # (the input's gradient is not summed by autograd)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    params = [mixer.conv1.weight, mixer.conv1.bias, mixer.bn.weight, mixer.bn.bias, mixer.conv2.weight,
              mixer.conv2.bias]
    ours = [x.grad, scale.grad] + [p.grad for p in params]

    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    scale_ref = scale.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    expected, batch_mean, batch_var = naive_mixer_train(x_ref, mixer, H, W, scale_ref)
    if add_input:
        expected = expected + x_ref
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad, scale_ref.grad] + [p.grad for p in params])
    factor = 1. if momentum is None else momentum  # the first batch: the plain average is the batch's statistics
    torch.testing.assert_close(mixer.bn.running_mean, (1 - factor) * running_mean + factor * batch_mean.detach())
    torch.testing.assert_close(mixer.bn.running_var, (1 - factor) * running_var + factor * batch_var.detach())
    assert mixer.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize('frozen', [(), ('input', 'fc1.weight', 'fc1.bias'), ('fc2.weight', 'fc2.bias')],
                         ids=['all-trained', 'frozen-fc1-and-input', 'frozen-fc2'])
def test_token_chunked_mlp_trains_in_chunks_with_the_formula_values_and_gradients(monkeypatch, frozen):
    """out_scale * fc2(GELU(fc1(x))) run in chunks of tokens (the last one shorter) in training: outputs and every
    gradient asked for, the scale's included, equal autograd on the formula."""
    monkeypatch.setattr(fan.layers, 'TRAINING_CHUNK_BYTES', 7 * 3 * C * 4)  # 7 tokens of 3C hidden values per chunk
    mlp = randomize(TokenChunkedMlp(C, 3 * C)).train()
    for name, p in mlp.named_parameters():
        p.requires_grad_(name not in frozen)
    tokens = torch.randn(2, 5, 6, C)  # 60 tokens: 8 chunks of 7 and one of 4
    x = tokens.clone().requires_grad_('input' not in frozen)
    scale = torch.randn(C, requires_grad=True)
    out = mlp(x, scale)
    assert 'GeluMlpInChunksBackward' in autograd_nodes(out.grad_fn)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, scale]
    ours = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    expected = linear(gelu(linear(x_ref, mlp.fc1)), mlp.fc2) * scale
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad] + [p.grad for p in params])


@pytest.mark.parametrize('scaled', [True, False])
def test_token_chunked_mlp_inference_computes_the_gelu_in_fc1(scaled):
    """CPU inference (no autograd) with the GELU in fc1's epilogue and the scale folded into fc2: the formula's values,
    to float32 rounding (tanh's GELU would miss them by 1e-3) and bfloat16 rounding under autocast."""
    mlp = randomize(TokenChunkedMlp(C, 3 * C))
    tokens, scale = torch.randn(2, 5, 6, C), torch.randn(C) if scaled else None
    expected = linear(gelu(linear(tokens, mlp.fc1)), mlp.fc2) * (scale if scaled else 1)
    with torch.no_grad():
        if fan.layers._MKLDNN_LINEAR:
            assert mlp._fused_inference_dtype(tokens) == torch.float32
        torch.testing.assert_close(mlp(tokens, scale), expected, atol=ATOL, rtol=ATOL)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if fan.layers._MKLDNN_LINEAR:
                assert mlp._fused_inference_dtype(tokens) == torch.bfloat16
            assert_close_in_bf16(mlp(tokens, scale), expected)
    assert mlp.train()._fused_inference_dtype(tokens.requires_grad_()) is None


@pytest.mark.parametrize('autograd', [True, False], ids=['training', 'onednn-inference'])
def test_hybrid_convnext_block_equals_timms_block(autograd):
    """fan's ConvNeXt block (layer scale folded into the MLP) against timm's with the same parameters: outputs and,
    in training, every gradient."""
    ours = randomize(ConvNeXtBlock(C, ls_init_value=1e-6, norm_layer=LegacyLayerNorm)).train(autograd)
    timms = timm.models.convnext.ConvNeXtBlock(C, conv_mlp=False, norm_layer=LegacyLayerNorm).train(autograd)
    timms.load_state_dict(ours.state_dict())
    x = torch.randn(2, C, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(autograd):
        got, want = ours(x.clone().requires_grad_(autograd)), timms(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    if autograd:
        grad_out = torch.randn_like(want)
        got.backward(grad_out)
        want.backward(grad_out)
        assert_same_gradients([p.grad for p in ours.parameters()], [p.grad for p in timms.parameters()])


@pytest.mark.parametrize('frozen', [(), ('input',), ('weight', 'bias')], ids=['all-trained', 'frozen-input',
                                                                               'frozen-conv'])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last], ids=['planar', 'channels-last'])
@pytest.mark.parametrize('kernel_size', [7, 3])
def test_depthwise_conv2d_gradients(kernel_size, layout, frozen):
    """Outputs and every gradient asked for against autograd on the formula; 7x7 kernels take the weight gradient as a
    swapped conv (``DepthwiseConvTraining``), 3x3 ones oneDNN's own, on maps smaller than the kernel too."""
    conv = randomize(DepthwiseConv2d(C, kernel_size)).train()
    for name, p in conv.named_parameters():
        p.requires_grad_(name not in frozen)
    images = torch.randn(3, C, 5, 9).contiguous(memory_format=layout)
    x = images.clone().requires_grad_('input' not in frozen)
    out = conv(x)
    assert ('DepthwiseConvTrainingBackward' in autograd_nodes(out.grad_fn)) == (
        kernel_size == 7 and 'weight' not in frozen)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ours = [x.grad, conv.weight.grad, conv.bias.grad]

    x_ref = images.clone().requires_grad_('input' not in frozen)
    conv.weight.grad = conv.bias.grad = None
    expected = torch.stack([depthwise_conv(img, conv.weight, conv.bias) for img in x_ref])
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad, conv.weight.grad, conv.bias.grad])


@pytest.mark.parametrize('autograd', [True, False], ids=['reference', 'onednn-inference'])
@pytest.mark.parametrize('residual', [True, False])
def test_dwconv_mlp(tokens, residual, autograd):
    mlp = randomize(DwConvMlp(C, 3 * C, residual=residual))
    with torch.set_grad_enabled(autograd):
        out = mlp(tokens, H, W)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_dwconv_mlp(tokens[b], mlp, H, W, residual), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('autograd', [True, False])
@pytest.mark.parametrize('fused', [True, False])
def test_token_mixing(tokens, fused, autograd):
    """Values with the fused attention (HeadwiseAttention in CPU float32 training, else SDPA) and with the explicit
    matmuls."""
    attn = randomize(TokenMixing(C, num_heads=HEADS))
    attn.fused_attn = fused
    with torch.set_grad_enabled(autograd):
        out = attn(tokens)
        assert attn._headwise(torch.randn(2, H * W, C, requires_grad=autograd)) == (fused and autograd)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_attention(tokens[b], attn), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('frozen', [(), ('input',), ('q.weight', 'q.bias', 'kv.weight', 'kv.bias')],
                         ids=['all-trained', 'frozen-input', 'frozen-q-and-kv'])
def test_token_mixing_training_keeps_the_probabilities_with_the_formula_gradients(frozen):
    """CPU float32 training takes HeadwiseAttention (probabilities kept, head by head on strided views): outputs and
    every gradient asked for equal autograd on the formula; above HEADWISE_MAX_TOKENS, or with attention dropout,
    SDPA runs."""
    attn = randomize(TokenMixing(C, num_heads=HEADS)).train()
    for name, p in attn.named_parameters():
        p.requires_grad_(name not in frozen)
    tokens = torch.randn(2, 7, C)
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = attn(x)
    if fan.layers._MKLDNN_LINEAR:
        assert 'HeadwiseAttentionBackward' in autograd_nodes(out.grad_fn)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    params = list(attn.parameters())
    ours = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    expected = torch.stack([naive_attention(x_ref[b], attn) for b in range(2)])
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad] + [p.grad for p in params])
    long_queries = torch.randn(1, fan.layers.HEADWISE_MAX_TOKENS + 1, C, requires_grad=True)
    assert not attn._headwise(long_queries)
    attn.attn_drop.p = 0.1
    assert not attn._headwise(long_queries[:, :7])


@pytest.mark.parametrize('residual', [True, False])
def test_channel_attention(tokens, residual):
    ca = randomize(ChannelAttention(C, num_heads=HEADS, mlp_ratio=2., mlp_residual=residual))
    out = ca(tokens, H, W)
    for b in range(2):
        torch.testing.assert_close(
            out[b], naive_channel_attention(tokens[b], ca, H, W, residual), atol=ATOL, rtol=ATOL)


def test_channel_gate_range(tokens):
    """Each softmax column sums to 1 and the key mean lies in [0, 1]: the sigmoid argument is within [min k, max k]."""
    ca = ChannelAttention(C, num_heads=HEADS).eval()
    gate = ca.channel_gate(tokens)
    assert gate.shape == (2, C)
    assert (gate > 0.5 - 1e-6).all() and (gate < 1 / (1 + math.exp(-1))).all()


def naive_se_mlp(tokens, mlp, H, W):
    y = naive_dwconv_mlp(tokens, mlp.mlp_v, H, W)  # (N, C)
    se = mlp.se
    pooled = y.mean(0)
    hidden = torch.relu(se.conv_reduce.weight[:, :, 0, 0] @ pooled + se.conv_reduce.bias)
    return y * torch.sigmoid(se.conv_expand.weight[:, :, 0, 0] @ hidden + se.conv_expand.bias)


@pytest.mark.parametrize('mixer', ['channel-attention', 'se'])
def test_fan_block(tokens, mixer):
    """x + gamma1 * attention(LN(x)), then + gamma2 * channel mixer(LN(x)): the layer scales are folded into the
    attention's projection and the channel gate (SeMlp: a product), with the same values."""
    mlp_layer = partial(ChannelAttention, num_heads=HEADS, mlp_ratio=2.) if mixer != 'se' else partial(
        SeMlp, mlp_ratio=2.)
    naive_mlp = naive_channel_attention if mixer != 'se' else naive_se_mlp
    block = randomize(FanBlock(C, num_heads=HEADS, mlp_layer=mlp_layer))
    out, h, w = block(tokens, H, W)
    assert (h, w) == (H, W)
    for b in range(2):
        x = tokens[b]
        x = x + block.gamma1 * naive_attention(layer_norm(x, block.norm1, 1e-6), block.attn)
        x = x + block.gamma2 * naive_mlp(layer_norm(x, block.norm2, 1e-6), block.mlp, H, W)
        torch.testing.assert_close(out[b], x, atol=ATOL, rtol=ATOL)


def test_se_mlp(tokens):
    mlp = randomize(SeMlp(C, mlp_ratio=2.))
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


@pytest.mark.parametrize('autograd', [True, False], ids=['reference', 'onednn-inference'])
def test_conv_stem(autograd, monkeypatch):
    """FAN-ViT's stem: four 3x3 stride-2 convs (no bias) each with an eval-mode BatchNorm, GELU between; CPU
    inference folds each norm into its conv and runs the GELU in the conv's epilogue, on the whole batch."""
    stem = randomize(ConvStem(patch_size=16, in_chans=3, embed_dim=32))
    images = torch.randn(3, 3, 48, 32)
    batches = []
    monkeypatch.setattr(stem, '_folded', lambda x, folded=stem._folded: batches.append(len(x)) or folded(x))
    with torch.set_grad_enabled(autograd):
        tokens, grid = stem(images)
    assert batches == ([] if autograd or not fan.layers._MKLDNN_CONV else [3])
    x = images
    for index, (conv, bn) in enumerate(stem.proj[::2]):
        columns = F.unfold(x, 3, padding=1, stride=2)  # (B, C_in * 9, H' * W')
        rows, cols = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        x = (conv.weight.flatten(1) @ columns).unflatten(2, (rows, cols))
        x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        x = x * bn.weight[:, None, None] + bn.bias[:, None, None]
        if index < 3:
            x = gelu(x)
    assert grid == (3, 2)
    torch.testing.assert_close(tokens, x.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)  # four folded convs


def assert_close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 values against the float32 formula: within 2 % of the largest value (bfloat16 keeps 8 bits)."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.mark.parametrize('grid', [(H, W), (1, 4)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_bf16_autocast_inference_paths_match_the_formula(grid, monkeypatch):
    """Under CPU autocast to bfloat16 without autograd, Linear, the depthwise mixer (folded norm, padding taps taken
    back in bfloat16), token attention (explicit bfloat16 matmuls head by head instead of SDPA, for as many images as
    heads), channel attention (its input cast once, its output in bfloat16) and the conv stem run their bfloat16
    paths; their values are those of the float32 formula to bfloat16 rounding."""
    rows, cols = grid
    g = torch.Generator().manual_seed(0)  # (values independent of the tests run before)
    tokens, scale = torch.randn(HEADS, rows * cols, C, generator=g), torch.randn(C, generator=g)
    layer, mixer = randomize(Linear(C, 24)), randomize(DepthwiseConvMixer(C))
    attn = randomize(TokenMixing(C, num_heads=HEADS))
    with torch.no_grad():
        attn.q.weight.mul_(0.25)  # logits of a few units, not tens: bfloat16's rounding of them stays below 2 %
    channel_attn = randomize(ChannelAttention(C, num_heads=HEADS, mlp_ratio=2.))
    stem = randomize(ConvStem(patch_size=16, in_chans=3, embed_dim=32))
    images = torch.randn(2, 3, 48, 32)

    def no_sdpa(*args, **kwargs):
        raise AssertionError('SDPA called')

    monkeypatch.setattr(F, 'scaled_dot_product_attention', no_sdpa)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        if fan.layers._MKLDNN_LINEAR:
            assert layer._fast_path_dtype(tokens) == torch.bfloat16
        if fan.layers._MKLDNN_CONV:
            assert mixer._inference_dtype(tokens) == torch.bfloat16
        got = [layer(tokens), mixer(tokens.clone(), rows, cols, scale=scale, add_input=True), attn(tokens),
               channel_attn(tokens, rows, cols)]
        stem_tokens, _ = stem(images)
    monkeypatch.undo()
    for b in range(HEADS):
        assert_close_in_bf16(got[0][b], linear(tokens[b], layer))
        assert_close_in_bf16(got[1][b], tokens[b] + scale * naive_mixer(tokens[b], mixer, rows, cols))
        assert_close_in_bf16(got[2][b], naive_attention(tokens[b], attn))
        # (bfloat16 out: the gate is cast to the values' dtype, so the residual stream stays in bfloat16)
        assert_close_in_bf16(got[3][b], naive_channel_attention(tokens[b], channel_attn, rows, cols))
    with torch.no_grad():
        assert_close_in_bf16(stem_tokens, stem(images)[0])
    with torch.autocast('cpu', dtype=torch.bfloat16):  # with autograd the float32 gate promotes the output, as before
        assert channel_attn(tokens, rows, cols).dtype == torch.float32


@pytest.mark.parametrize('path', ['bf16', 'sdpa', 'explicit'])
@pytest.mark.parametrize('shifted', [True, False], ids=['shift-mask', 'no-mask'])
def test_window_attention_matches_the_formula(shifted, path, monkeypatch):
    """FAN-Swin's window attention, per window and head softmax(q k^T / sqrt(d) + bias + mask) v, then the projection:
    through SDPA (``fused_attn``), the explicit matmuls, and under CPU autocast to bfloat16 without autograd the
    bfloat16 path (query scale in the qkv weights, bias and mask added in bfloat16, softmax in place; SDPA not called)
    to bfloat16 rounding."""
    window, heads, images, windows = 3, 2, 2, 4
    attn = randomize(WindowAttention(C, num_heads=heads, window_size=window))
    with torch.no_grad():
        attn.qkv.weight.mul_(0.25)  # logits of a few units, not tens: bfloat16's rounding of them stays below 2 %
    use_fan_linear(attn)
    attn.fused_attn = path == 'sdpa'
    N = window * window
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images * windows, N, C, generator=g)
    mask = torch.where(torch.rand(windows, N, N, generator=g) < 0.3, -100., 0.) if shifted else None
    if path == 'bf16':
        def not_called(*args, **kwargs):
            raise AssertionError('SDPA called')

        monkeypatch.setattr(F, 'scaled_dot_product_attention', not_called)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=path == 'bf16'):
        got = attn(x, mask)
    monkeypatch.undo()
    d = C // heads
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(N, N, heads)
    for w in range(images * windows):
        qkv = linear(x[w], attn.qkv)
        out = []
        for i in range(heads):
            q, k, v = (qkv[:, j * C + i * d:j * C + (i + 1) * d] for j in range(3))
            logits = q @ k.T / math.sqrt(d) + bias[:, :, i]
            if mask is not None:
                logits = logits + mask[w % windows]
            out.append(torch.softmax(logits, -1) @ v)
        want = linear(torch.cat(out, -1), attn.proj)
        if path == 'bf16':
            assert_close_in_bf16(got[w], want)
        else:
            torch.testing.assert_close(got[w], want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('block_type', ['swin', 'fan-swin'])
def test_swin_blocks_enter_the_window_partition_in_bf16_with_timms_values(block_type):
    """Under CPU autocast to bfloat16 without autograd, the Swin blocks hand the window shift and partition a bfloat16
    map; their outputs are exactly those of the same blocks given norm1's float32 output, timm's order (the attention's
    first product rounds it to bfloat16 after the partition), shifted windows included."""
    block_class = SwinBlock if block_type == 'swin' else FanSwinBlock
    block = randomize(block_class(C, num_heads=2, input_resolution=(6, 6), window_size=3, shift_size=1))
    x = torch.randn(2, 6, 6, C, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert block._attention_input(x).dtype == torch.bfloat16
        got = block(x)
        block._attention_input = block.norm1  # timm's forward: norm1's float32 output into the partition
        want = block(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_bf16_token_attention_of_fewer_images_than_heads_takes_sdpa(monkeypatch):
    """bfloat16 autocast inference of fewer images than heads: SDPA instead of the head-by-head products, the formula's
    values to bfloat16 rounding."""
    attn, tokens = randomize(TokenMixing(C, num_heads=HEADS)), torch.randn(HEADS - 1, H * W, C)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *args, **kw: calls.append(1) or sdpa(*args, **kw))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        got = attn(tokens)
    assert calls == [1]
    for b in range(HEADS - 1):
        assert_close_in_bf16(got[b], naive_attention(tokens[b], attn))


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


@pytest.mark.skipif(not fan.layers._GLIBC, reason='glibc malloc only')
def test_tune_malloc_keeps_freed_activations_mapped():
    """Fresh processes: 64 MiB tensors freed and allocated again are fresh memory to page in (above the largest mmap
    threshold glibc adapts to, each is unmapped when freed) until ``tune_malloc`` has run; then they come back from
    the heap without page faults. The first CPU training forward tunes too; ``FAN_TUNE_MALLOC=0`` leaves glibc as it is."""
    script = '''
import resource, sys, torch
import fan

def faults_of_reused_maps():
    for _ in range(6):  # 64 MiB, written and freed
        torch.ones(2 ** 24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(2 ** 24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reused_maps()
if sys.argv[1] == 'call':
    fan.layers.tune_malloc()
else:  # a training forward on the CPU
    fan.layers.run_in_batch_chunks(lambda x: x * 2, torch.ones(1, 3, 4, 4, requires_grad=True), 1., training=True)
print(default, faults_of_reused_maps())
'''

    def faults(how, **env):
        result = subprocess.run([sys.executable, '-c', script, how], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **env})
        assert result.returncode == 0, result.stderr[-2000:]
        return list(map(int, result.stdout.split()))

    pages = 4 * 2 ** 14  # of 4 KiB in four maps
    for how in ('call', 'training'):
        default, tuned = faults(how)
        assert default >= pages and tuned < 100, (how, default, tuned)
    default, untuned = faults('call', FAN_TUNE_MALLOC='0')
    assert default >= pages and untuned >= pages, (default, untuned)


def test_batch_chunks_are_sized_in_the_dtype_the_layers_compute_in(monkeypatch):
    """CPU inference splits the batch by the bytes of its largest activation: float32 images under bfloat16 autocast
    count at two bytes a value, plain float32 at four; the outputs are the whole batch's."""
    monkeypatch.setattr(fan.layers, 'INFERENCE_CHUNK_BYTES', 1024)
    x = torch.randn(16, 3, 8, 8)
    chunks = []

    def features(images: torch.Tensor) -> torch.Tensor:
        chunks.append(images.shape[0])
        return images.flatten(1) * 2

    with torch.no_grad():
        out = fan.layers.run_in_batch_chunks(features, x, 1., training=False)  # 256 bytes an image
        assert chunks == [4] * 4 and torch.equal(out, x.flatten(1) * 2)
        chunks.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            fan.layers.run_in_batch_chunks(features, x, 1., training=False)  # 128 bytes an image
        assert chunks == [8, 8]
        chunks.clear()
    fan.layers.run_in_batch_chunks(features, x, 1., training=False)  # with autograd: whole
    assert chunks == [16]
