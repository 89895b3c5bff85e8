"""Naive references written from the formulas (explicit loops, no shared code with fan), and the checks that the
layer tests (plain modules) and the CPU-kernel tests (fast modules) share."""
import math

import torch
import torch.nn.functional as F

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


def randomize_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics for every BatchNorm of a model (not the 0 / 1 of a new one, which would hide a norm
    that is skipped or folded wrongly); the weights stay as the model initialised them."""
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return model


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


def naive_se_mlp(tokens, mlp, H, W):
    y = naive_dwconv_mlp(tokens, mlp.mlp_v, H, W)  # (N, C)
    se = mlp.se
    pooled = y.mean(0)
    hidden = torch.relu(se.conv_reduce.weight[:, :, 0, 0] @ pooled + se.conv_reduce.bias)
    return y * torch.sigmoid(se.conv_expand.weight[:, :, 0, 0] @ hidden + se.conv_expand.bias)


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


def assert_close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 values against the float32 formula: within 2 % of the largest value (bfloat16 keeps 8 bits)."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2


