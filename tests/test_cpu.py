"""fan.cpu: each fast module against the formula (tests/naive.py), fan.optimize against the plain model, and the
process-wide malloc setting as an explicit step."""
import copy
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer import WindowAttention
from timm.models.xcit import ConvPatchEmbed

import fan
from fan.cpu import kernels, optimize
from fan.cpu.modules import (
    FastConvStem, FastDepthwiseConv2d, FastDwConvMlp, FastGeluMlp, FastLinear, FastTokenMixing, FastWindowAttention)
from fan.layers import ChannelAttention, DwConvMlp, TokenMixing
from naive import (
    ATOL, assert_close_in_bf16, assert_same_gradients, autograd_nodes, depthwise_conv, gelu, linear, naive_attention,
    naive_channel_attention, naive_dwconv_mlp, naive_mixer_train, randomize, randomize_norm_statistics)

torch.manual_seed(0)
H, W, C, HEADS = 5, 6, 16, 4


def fast(module: nn.Module, fast_class: type) -> nn.Module:
    """``module`` with its class swapped for ``fast_class``, as fan.optimize does."""
    module.__class__ = fast_class
    return module


@pytest.mark.parametrize('frozen', [(), ('weight',), ('input',)], ids=['all-trained', 'frozen-weight', 'frozen-input'])
@pytest.mark.parametrize('features', [(16, 24), (24, 16)], ids=['widening', 'narrowing'])
def test_fast_linear_matches_the_formula(frozen, features):
    """oneDNN's product with the bias in its epilogue: inference values, and in training the values and every
    gradient asked for, against x @ W.T + b; the weight gradient is taken in either orientation."""
    layer = optimize(randomize(nn.Linear(*features)))
    assert type(layer) is FastLinear
    tokens = torch.randn(2, 7, features[0])
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens), linear(tokens, layer), atol=ATOL, rtol=ATOL)
    layer.weight.requires_grad_('weight' not in frozen)
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = layer(x)
    if kernels.MKLDNN_LINEAR:
        assert 'OneDnnLinearBackward' in autograd_nodes(out.grad_fn)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ours = [x.grad, layer.weight.grad, layer.bias.grad]
    layer.weight.grad = layer.bias.grad = None
    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    expected = linear(x_ref, layer)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad, layer.weight.grad, layer.bias.grad])


def test_fast_linear_input_gradient_of_a_broadcast_output_gradient():
    """``out.sum().backward()`` hands the linear an expanded (stride-0) output gradient: its input gradient through
    oneDNN's product equals the formula's, ones @ W."""
    layer = optimize(randomize(nn.Linear(16, 24)))
    x = torch.randn(2, 7, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 7, 16), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('grid', [(H, W), (1, 1), (1, 4), (3, 2)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_fast_dwconv_mlp_inference_folds_the_norm(grid, residual):
    """CPU inference: conv1 with the GELU in its epilogue, conv2 with the eval-mode BatchNorm and gamma folded in and
    the shift's taps on the zero padding taken back (grids of one row or column have every border)."""
    mlp = optimize(randomize(DwConvMlp(C, 3 * C, residual=residual)))
    rows, cols = grid
    tokens = torch.randn(2, rows * cols, C)
    with torch.no_grad():
        assert mlp._fused_path(tokens, kernels.cpu_fast_path_dtype(tokens)) == ('inference' if kernels.MKLDNN_CONV else None)
        out = mlp(tokens, rows, cols)
    for b in range(2):
        expected = naive_dwconv_mlp(tokens[b], mlp, rows, cols, residual)
        torch.testing.assert_close(out[b], expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(
    'frozen', [(), ('dwconv.bn.weight', 'dwconv.bn.bias', 'dwconv.conv2.weight'),
               ('input', 'fc1.weight', 'fc1.bias', 'dwconv.conv1.weight', 'dwconv.conv1.bias')],
    ids=['all-trained', 'frozen-norm-and-conv2', 'frozen-input-side'])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('grid', [(H, W), (1, 4)], ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('keep_conv1', [True, False], ids=['conv1-kept', 'conv1-recomputed'])
def test_fast_dwconv_mlp_training_recomputes_the_same_values_and_gradients(
        frozen, momentum, grid, residual, keep_conv1, monkeypatch):
    """Training keeps only conv1's input and output, recomputes GELU and norm in the backward pass and takes the
    convs' input gradients as convs with flipped kernels: outputs, every gradient asked for and the running
    statistics (updated once; momentum None is the plain average) equal plain autograd on the formula, also when
    only some inputs need gradients, on a grid of one row, with the residual added on conv2's map, and when conv1's
    output is recomputed in the backward pass (``RECOMPUTE_CONV_BYTES``) instead of kept."""
    if not keep_conv1:
        monkeypatch.setattr(kernels, 'RECOMPUTE_CONV_BYTES', 0)
    rows, cols = grid
    tokens = torch.randn(2, rows * cols, C)
    mlp = optimize(randomize(DwConvMlp(C, 2 * C, residual=residual))).train()
    mixer = mlp.dwconv
    mixer.bn.momentum = momentum
    for name, p in mlp.named_parameters():
        p.requires_grad_(name not in frozen)
    running_mean, running_var = mixer.bn.running_mean.clone(), mixer.bn.running_var.clone()
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = mlp(x, rows, cols)
    assert 'ConvGeluNormConvBackward' in autograd_nodes(out.grad_fn)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    params = list(mlp.parameters())
    ours = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None

    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    hidden = linear(x_ref, mlp.fc1)
    mixed, batch_mean, batch_var = naive_mixer_train(hidden, mixer, rows, cols, mlp.gamma)
    expected = linear(hidden + mixed if residual else mixed, mlp.fc2)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad] + [p.grad for p in params])
    factor = 1. if momentum is None else momentum  # the first batch: the plain average is the batch's statistics
    torch.testing.assert_close(mixer.bn.running_mean, (1 - factor) * running_mean + factor * batch_mean.detach())
    torch.testing.assert_close(mixer.bn.running_var, (1 - factor) * running_var + factor * batch_var.detach())
    assert mixer.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize('frozen', [(), ('input', 'fc1.weight', 'fc1.bias'), ('fc2.weight', 'fc2.bias')],
                         ids=['all-trained', 'frozen-fc1-and-input', 'frozen-fc2'])
def test_fast_gelu_mlp_trains_in_chunks_with_the_formula_values_and_gradients(monkeypatch, frozen):
    """fc2(GELU(fc1(x))) run in chunks of tokens (the last one shorter) in training: outputs and every gradient asked
    for equal autograd on the formula."""
    monkeypatch.setattr(kernels, 'TRAINING_CHUNK_BYTES', 7 * 3 * C * 4)  # 7 tokens of 3C hidden values per chunk
    mlp = fast(randomize(Mlp(C, 3 * C)), FastGeluMlp).train()
    for name, p in mlp.named_parameters():
        p.requires_grad_(name not in frozen)
    tokens = torch.randn(2, 5, 6, C)  # 60 tokens: 8 chunks of 7 and one of 4
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = mlp(x)
    assert 'GeluMlpInChunksBackward' in autograd_nodes(out.grad_fn)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    ours = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    x_ref = tokens.clone().requires_grad_('input' not in frozen)
    expected = linear(gelu(linear(x_ref, mlp.fc1)), mlp.fc2)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad] + [p.grad for p in params])


def test_fast_gelu_mlp_inference_computes_the_gelu_in_fc1():
    """CPU inference (no autograd) with the GELU in fc1's epilogue: the formula's values, to float32 rounding (tanh's
    GELU would miss them by 1e-3) and bfloat16 rounding under autocast."""
    mlp = fast(randomize(Mlp(C, 3 * C)), FastGeluMlp)
    tokens = torch.randn(2, 5, 6, C)
    expected = linear(gelu(linear(tokens, mlp.fc1)), mlp.fc2)
    with torch.no_grad():
        assert mlp._fused_inference(tokens) == kernels.MKLDNN_LINEAR
        torch.testing.assert_close(mlp(tokens), expected, atol=ATOL, rtol=ATOL)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert_close_in_bf16(mlp(tokens), expected)
    assert not mlp.train()._fused_inference(tokens.requires_grad_())


@pytest.mark.parametrize('frozen', [(), ('input',), ('weight', 'bias')], ids=['all-trained', 'frozen-input',
                                                                               'frozen-conv'])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last], ids=['planar', 'channels-last'])
def test_fast_depthwise_conv2d_gradients(layout, frozen):
    """A 7x7 depthwise conv whose weight gradient is a swapped conv (``DepthwiseConvTraining``): outputs and every
    gradient asked for against autograd on the formula, on maps smaller than the kernel too."""
    conv = randomize(nn.Conv2d(C, C, 7, padding=3, groups=C)).train()
    assert FastDepthwiseConv2d.fits(conv) and not FastDepthwiseConv2d.fits(nn.Conv2d(C, C, 3, padding=1, groups=C))
    conv = fast(conv, FastDepthwiseConv2d)
    for name, p in conv.named_parameters():
        p.requires_grad_(name not in frozen)
    images = torch.randn(3, C, 5, 9).contiguous(memory_format=layout)
    x = images.clone().requires_grad_('input' not in frozen)
    out = conv(x)
    assert ('DepthwiseConvTrainingBackward' in autograd_nodes(out.grad_fn)) == ('weight' not in frozen)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ours = [x.grad, conv.weight.grad, conv.bias.grad]
    x_ref = images.clone().requires_grad_('input' not in frozen)
    conv.weight.grad = conv.bias.grad = None
    expected = torch.stack([depthwise_conv(img, conv.weight, conv.bias) for img in x_ref])
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert_same_gradients(ours, [x_ref.grad, conv.weight.grad, conv.bias.grad])


@pytest.mark.parametrize('frozen', [(), ('input',), ('q.weight', 'q.bias', 'kv.weight', 'kv.bias')],
                         ids=['all-trained', 'frozen-input', 'frozen-q-and-kv'])
def test_fast_token_mixing_training_keeps_the_probabilities_with_the_formula_gradients(frozen):
    """CPU float32 training takes HeadwiseAttention (probabilities kept, head by head on strided views): outputs and
    every gradient asked for equal autograd on the formula; above HEADWISE_MAX_TOKENS, or with attention dropout,
    the plain forward (SDPA) runs."""
    attn = optimize(randomize(TokenMixing(C, num_heads=HEADS))).train()
    assert type(attn) is FastTokenMixing
    for name, p in attn.named_parameters():
        p.requires_grad_(name not in frozen)
    tokens = torch.randn(2, 7, C)
    x = tokens.clone().requires_grad_('input' not in frozen)
    out = attn(x)
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
    long_tokens = torch.randn(1, kernels.HEADWISE_MAX_TOKENS + 1, C, requires_grad=True)
    assert not attn._headwise(long_tokens)
    attn.attn_drop.p = 0.1
    assert not attn._headwise(long_tokens[:, :7])


def naive_conv_stem(stem: ConvPatchEmbed, images: torch.Tensor) -> torch.Tensor:
    """Four 3x3 stride-2 convs (no bias), each with an eval-mode BatchNorm, GELU between -> tokens (B, N, C)."""
    x = images
    for index, (conv, bn) in enumerate(stem.proj[::2]):
        columns = F.unfold(x, 3, padding=1, stride=2)  # (B, C_in * 9, H' * W')
        rows, cols = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        x = (conv.weight.flatten(1) @ columns).unflatten(2, (rows, cols))
        x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        x = x * bn.weight[:, None, None] + bn.bias[:, None, None]
        if index < 3:
            x = gelu(x)
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize('autograd', [True, False], ids=['plain-forward', 'folded-inference'])
def test_fast_conv_stem(autograd, monkeypatch):
    """FAN-ViT's stem: CPU inference folds each norm into its conv and runs the GELU in the conv's epilogue; with
    autograd the plain stem runs (on a channels-last copy). The formula's values either way."""
    stem = optimize(randomize(ConvPatchEmbed(patch_size=16, in_chans=3, embed_dim=32)))
    assert type(stem) is FastConvStem
    images = torch.randn(3, 3, 48, 32)
    batches = []
    monkeypatch.setattr(stem, '_folded', lambda x, folded=stem._folded: batches.append(len(x)) or folded(x))
    with torch.set_grad_enabled(autograd):
        tokens, grid = stem(images)
    assert batches == ([] if autograd or not kernels.MKLDNN_CONV else [3])
    assert grid == (3, 2)
    torch.testing.assert_close(tokens, naive_conv_stem(stem, images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('grid', [(H, W), (1, 4)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_bf16_autocast_inference_paths_match_the_formula(grid, monkeypatch):
    """Under CPU autocast to bfloat16 without autograd, the fast linear, FAN MLP (folded norm, padding taps taken
    back in bfloat16), token attention (head by head instead of SDPA, for as many images as heads), channel attention
    and conv stem give the float32 formula's values to bfloat16 rounding."""
    rows, cols = grid
    g = torch.Generator().manual_seed(0)  # (values independent of the tests run before)
    tokens = torch.randn(HEADS, rows * cols, C, generator=g)
    layer, mlp = optimize(randomize(nn.Linear(C, 24))), optimize(randomize(DwConvMlp(C, 2 * C)))
    attn = randomize(TokenMixing(C, num_heads=HEADS))
    with torch.no_grad():
        attn.q.weight.mul_(0.25)  # logits of a few units, not tens: bfloat16's rounding of them stays below 2 %
    optimize(attn)
    channel_attn = optimize(randomize(ChannelAttention(C, 2 * C, num_heads=HEADS)))
    stem = optimize(randomize(ConvPatchEmbed(patch_size=16, in_chans=3, embed_dim=32)))
    images = torch.randn(2, 3, 48, 32)

    def no_sdpa(*args, **kwargs):
        raise AssertionError('SDPA called')

    monkeypatch.setattr(F, 'scaled_dot_product_attention', no_sdpa)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert mlp._fused_path(tokens, kernels.cpu_fast_path_dtype(tokens)) == ('inference' if kernels.MKLDNN_CONV else None)
        got = [layer(tokens), mlp(tokens, rows, cols), attn(tokens), channel_attn(tokens, rows, cols)]
        stem_tokens, _ = stem(images)
    monkeypatch.undo()
    for b in range(HEADS):
        assert_close_in_bf16(got[0][b], linear(tokens[b], layer))
        assert_close_in_bf16(got[1][b], naive_dwconv_mlp(tokens[b], mlp, rows, cols))
        assert_close_in_bf16(got[2][b], naive_attention(tokens[b], attn))
        torch.testing.assert_close(got[3][b].float(), naive_channel_attention(tokens[b], channel_attn, rows, cols),
                                   atol=2e-2 * got[3].abs().max().item(), rtol=0)
    with torch.no_grad():
        assert ((stem_tokens.float() - stem(images)[0]).abs().max() / stem_tokens.abs().max()).item() < 2e-2


def test_bf16_token_attention_of_fewer_images_than_heads_takes_sdpa(monkeypatch):
    """bfloat16 autocast inference of fewer images than heads: SDPA instead of the head-by-head products, the formula's
    values to bfloat16 rounding."""
    attn, tokens = optimize(randomize(TokenMixing(C, num_heads=HEADS))), torch.randn(HEADS - 1, H * W, C)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *args, **kw: calls.append(1) or sdpa(*args, **kw))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        got = attn(tokens)
    assert calls == [1]
    for b in range(HEADS - 1):
        assert_close_in_bf16(got[b], naive_attention(tokens[b], attn))


@pytest.mark.parametrize('path', ['bf16', 'sdpa', 'training'])
@pytest.mark.parametrize('shifted', [True, False], ids=['shift-mask', 'no-mask'])
def test_fast_window_attention_matches_the_formula(shifted, path, monkeypatch):
    """FAN-Swin's window attention, per window and head softmax(q k^T / sqrt(d) + bias + mask) v, then the projection:
    float32 eval through SDPA, bfloat16 autocast inference in bfloat16 (query scale in the qkv weights, bias and mask
    added in bfloat16, SDPA not called) to bfloat16 rounding, training through timm's forward."""
    window, heads, images, windows = 3, 2, 2, 4
    attn = randomize(WindowAttention(C, num_heads=heads, window_size=window))
    with torch.no_grad():
        attn.qkv.weight.mul_(0.25)  # logits of a few units, not tens: bfloat16's rounding of them stays below 2 %
    attn = optimize(attn).train(path == 'training')
    assert type(attn) is FastWindowAttention
    N = window * window
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images * windows, N, C, generator=g)
    mask = torch.where(torch.rand(windows, N, N, generator=g) < 0.3, -100., 0.) if shifted else None
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *args, **kw: calls.append(1) or sdpa(*args, **kw))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=path == 'bf16'):
        got = attn(x, mask)
    monkeypatch.undo()
    assert len(calls) == (1 if path == 'sdpa' else 0)
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


FAMILIES = ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224']


def tiny(name: str) -> nn.Module:
    """The family's tiny model at 64 px with 10 classes, BatchNorm statistics randomised (not 0 / 1)."""
    return randomize_norm_statistics(timm.create_model(name, num_classes=10, img_size=64, drop_path_rate=0.))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize('name', FAMILIES)
def test_optimize_keeps_the_parameters_and_matches_the_plain_model_in_every_mode(name):
    """fan.optimize swaps classes in place: the same Parameter objects and state dict; eval (float32, bfloat16
    autocast, with autograd) and training outputs and gradients equal the plain model's."""
    plain = tiny(name)
    model = copy.deepcopy(plain)
    params = list(model.parameters())
    assert optimize(model) is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert sum(type(m).__name__.startswith('Fast') for m in model.modules()) >= 10
    x = torch.randn(3, 3, 64, 64)
    plain.eval(), model.eval()
    with torch.no_grad():
        assert relative_error(model(x), plain(x)) < 1e-5
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert relative_error(model(x), plain(x)) < 3e-2
    assert relative_error(model(x), plain(x)) < 1e-5  # eval with autograd
    plain.train(), model.train()
    out, want = model(x), plain(x)
    assert relative_error(out, want) < 1e-5
    out.square().sum().backward()
    want.square().sum().backward()
    largest = max(p.grad.abs().max() for p in plain.parameters())
    for (key, ours), theirs in zip(model.named_parameters(), plain.parameters()):
        assert (ours.grad - theirs.grad).abs().max() <= 1e-5 * largest, key


@pytest.mark.parametrize('name', FAMILIES)
def test_optimized_model_shows_weight_writes_at_once(name):
    """No cached weight: after a first forward, a write through ``.data`` and a ``load_state_dict`` show in the next
    float32, bfloat16-autocast and training output, which equals that of a fresh copy of the written model (and, in
    float32, of the plain model with the same writes)."""
    plain = tiny(name)
    model = optimize(copy.deepcopy(plain))
    x = torch.randn(2, 3, 64, 64)
    modes = {'fp32': (False, torch.no_grad), 'bf16': (False, lambda: torch.autocast('cpu', dtype=torch.bfloat16)),
             'train': (True, torch.enable_grad)}
    for mode, (training, context) in modes.items():
        model.train(training), plain.train(training)
        with torch.no_grad(), context():
            model(x)  # a first forward before the writes
            plain(x)
        for ours, theirs in zip(model.parameters(), plain.parameters()):
            ours.data.mul_(1.25)
            theirs.data.mul_(1.25)
        fresh = copy.deepcopy(model)
        with torch.no_grad(), context():
            torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)
            if mode != 'bf16':
                assert relative_error(model(x), plain(x)) < 1e-5, mode
        changed = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(changed)
        fresh = copy.deepcopy(model)
        with torch.no_grad(), context():
            torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)
        plain.load_state_dict(changed)


@pytest.mark.parametrize('name', FAMILIES)
def test_optimized_model_falls_back_where_a_norm_is_replaced(name):
    """After ``convert_sync_batchnorm`` every SyncBatchNorm of an optimized model is reached, in eval and training
    (the fused mixers and the folded stem step aside), and the outputs equal the plain converted model's."""
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(tiny(name))
    model = optimize(copy.deepcopy(plain))
    norms = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert norms and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    reached = set()
    for norm in norms:
        norm.register_forward_hook(lambda module, args, out: reached.add(id(module)))
    x = torch.randn(2, 3, 64, 64)
    for training in (False, True):
        reached.clear()
        model.train(training), plain.train(training)
        with torch.no_grad():
            assert relative_error(model(x), plain(x)) < 1e-5
        assert len(reached) == len(norms), training


def test_optimized_hooks_on_fc1_keep_what_they_captured():
    """A hook on a FAN MLP's fc1 sees its output, and that tensor is not overwritten by the fused residual sum."""
    model = optimize(tiny('fan_tiny_12_p16_224')).eval()
    captured = []
    model.blocks[0].mlp.mlp_v.fc1.register_forward_hook(lambda m, args, out: captured.append((out, out.clone())))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    out, at_hook = captured[0]
    assert torch.equal(out, at_hook)


@pytest.mark.parametrize('name', ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid'])
def test_optimized_model_under_torch_func_transforms_takes_the_plain_path(name):
    """torch.func's grad and vmap through an optimized eval-mode model (the kernels' autograd Functions do not support
    transforms, so they step aside): the same input gradient and outputs as plain autograd and a batched call."""
    model = optimize(tiny(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    grad = torch.func.grad(lambda images: model(images).square().sum())(x)
    x_ref = x.clone().requires_grad_()
    model(x_ref).square().sum().backward()
    torch.testing.assert_close(grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    batched = torch.func.vmap(lambda image: model(image[None])[0])(x)
    torch.testing.assert_close(batched, model(x), atol=1e-5, rtol=1e-4)


def test_create_model_returns_the_plain_model_unless_asked():
    assert not any(type(m).__name__.startswith('Fast') for m in fan.create_model('fan_tiny_12_p16_224').modules())
    optimized = fan.create_model('fan_tiny_12_p16_224', optimize=True)
    assert any(type(m) is FastDwConvMlp for m in optimized.modules())


MALLOC_SCRIPT = '''
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
model = fan.optimize(fan.create_model('fan_tiny_12_p16_224', img_size=64)).eval()
with torch.no_grad():
    model(torch.randn(2, 3, 64, 64))  # a model's forward leaves the process as it was
after_forward = faults_of_reused_maps()
if sys.argv[1] == 'tune':
    fan.tune_malloc()
print(default, after_forward, faults_of_reused_maps())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_malloc_is_tuned_only_when_asked():
    """Fresh processes: 64 MiB tensors freed and allocated again are fresh memory to page in (glibc unmaps them when
    freed), also after a forward of an optimized FAN model; after ``fan.tune_malloc()`` they come back from the heap
    without page faults, unless ``FAN_TUNE_MALLOC=0``."""
    def faults(how, **env):
        result = subprocess.run([sys.executable, '-c', MALLOC_SCRIPT, how], capture_output=True, text=True,
                                timeout=120, env={**os.environ, **env})
        assert result.returncode == 0, result.stderr[-2000:]
        return list(map(int, result.stdout.split()))

    pages = 4 * 2 ** 14  # of 4 KiB in four maps
    default, after_forward, tuned = faults('tune')
    assert default >= pages and after_forward >= pages and tuned < 100, (default, after_forward, tuned)
    assert faults('tune', FAN_TUNE_MALLOC='0')[2] >= pages


def test_commands_optimize_on_the_cpu_unless_told_not_to():
    """The commands' model (``model_from_args``) has the fast modules on the CPU, not with ``--no-optimize``, nor on
    another device; ``fan export`` has no such option and exports the plain model."""
    from fan.cli import build_parser
    from fan.options import model_from_args, uses_fast_modules

    parser = build_parser()
    args = parser.parse_args(['predict', '--model', 'fan_tiny_12_p16_224'])
    assert any(type(m) is FastDwConvMlp for m in model_from_args(args, torch.device('cpu')).modules())
    assert not uses_fast_modules(args, 'cuda')
    args = parser.parse_args(['predict', '--model', 'fan_tiny_12_p16_224', '--no-optimize'])
    assert not any(type(m).__name__.startswith('Fast') for m in model_from_args(args).modules())
    with pytest.raises(SystemExit):
        parser.parse_args(['export', '--model', 'fan_tiny_12_p16_224', '--no-optimize'])
