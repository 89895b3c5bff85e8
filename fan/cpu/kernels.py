"""CPU kernels behind :func:`fan.optimize`: oneDNN products with the bias and GELU in their epilogues, autograd
Functions that keep fewer activations, and the tests of when they apply (plain eager CPU tensors in float32, or
bfloat16 under CPU autocast).

Each function computes a formula that the plain modules of :mod:`fan.layers` compute with ordinary ops;
``tests/test_cpu.py`` checks every one against a naive reference.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'plain_eager', 'cpu_fast_path_dtype', 'needs_autograd', 'bf16_inference_input', 'onednn_inference',
    'onednn_linear', 'onednn_conv', 'fold_out_scale', 'batch_norm_scale_shift', 'remove_padding_taps',
    'OneDnnLinear', 'GeluMlpInChunks', 'ConvGeluNormConv', 'DepthwiseConvTraining', 'depthwise_weight_grad',
    'HeadwiseAttention', 'MKLDNN_LINEAR', 'MKLDNN_CONV',
]

MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
MKLDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
_FUNCTORCH_ACTIVE = getattr(torch._C, '_are_functorch_transforms_active', lambda: False)

RECOMPUTE_CONV_BYTES = 32 * 2 ** 20  # training: mixer conv1 outputs this large are recomputed, not kept (memory)
TRAINING_CHUNK_BYTES = 8 * 2 ** 20  # hidden activations of one chunk of tokens (GeluMlpInChunks, CPU training)
SWAPPED_WEIGHT_GRAD_MIN_KERNEL = 7  # smallest depthwise kernel whose weight gradient runs as a swapped conv
HEADWISE_MAX_TOKENS = 576  # CPU float32: HeadwiseAttention measured faster than SDPA up to here (training)


def fold_out_scale(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        out_scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight (out, ...) and bias (out,) of a linear layer or conv whose output channels are then multiplied by
    ``out_scale`` (out,), with the scale folded in: no pass over the output for it and no output kept for its
    gradient. Unchanged for None."""
    if out_scale is None:
        return weight, bias
    weight = weight * out_scale.reshape([-1] + [1] * (weight.dim() - 1))
    return weight, (bias * out_scale if bias is not None else None)


def plain_eager(x: torch.Tensor) -> bool:
    """True when ``x`` is an ordinary tensor in eager mode: not an FX proxy, fake or functional tensor, and no
    tracing, ``torch.compile``, export, ONNX export or ``torch.func`` transform (grad, vmap, jvp) is under way. The fast
    paths below only run then; the reference computation is what tracers, compilers, exporters and transforms see."""
    return (
        type(x) is torch.Tensor
        and not _FUNCTORCH_ACTIVE()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.onnx.is_in_onnx_export()
    )


def cpu_fast_path_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the CPU fast paths compute ``x`` in: float32 for a plain eager float32 CPU tensor without autocast,
    bfloat16 for a plain eager float32 or bfloat16 CPU tensor under CPU autocast to bfloat16; None otherwise (other
    devices, dtypes or autocast; tracing, compiling, exporting, transforms). Checked before anything else reads ``x``:
    under FX tracing it is a proxy, which must not reach a Python condition."""
    if not plain_eager(x) or x.device.type != 'cpu':
        return None
    if not torch.is_autocast_enabled('cpu'):
        return torch.float32 if x.dtype == torch.float32 else None
    autocast_bf16 = torch.get_autocast_dtype('cpu') == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return torch.bfloat16 if autocast_bf16 else None


def needs_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """True when autograd records the module's computation on ``x``: grad mode on, and ``x`` or a parameter needs it."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def bf16_inference_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x cast to bfloat16 under CPU autocast to bfloat16 without autograd, else x: one cast for a module that hands x
    to several products, each of which would cast it again."""
    if cpu_fast_path_dtype(x) == torch.bfloat16 and not needs_autograd(x, module):
        return x.to(torch.bfloat16)
    return x


def onednn_inference(x: torch.Tensor, module: nn.Module) -> Optional[torch.dtype]:
    """The dtype ``module``'s oneDNN inference path computes in for ``x``, or None where the reference path runs:
    float32 for plain eager float32 on the CPU without autocast, bfloat16 under CPU autocast to bfloat16 (``x`` is cast
    to it); eval mode and no autograd in both."""
    dtype = cpu_fast_path_dtype(x) if MKLDNN_CONV and not module.training else None
    return None if dtype is None or needs_autograd(x, module) else dtype


def onednn_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        gelu: Optional[nn.GELU] = None,
) -> torch.Tensor:
    """x (..., in) @ weight.T (+ bias), then ``gelu``, in one oneDNN call: the bias and the activation run in the
    product's epilogue instead of as passes of their own. The weight and bias are cast to ``x``'s dtype."""
    weight = weight.to(x.dtype)  # (no copy when it has it)
    bias = bias.to(x.dtype) if bias is not None else None
    activation, algorithm = ('gelu', gelu.approximate) if gelu is not None else ('none', '')
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


def onednn_conv(
        x: torch.Tensor,
        conv: nn.Conv2d,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        gelu: Optional[nn.GELU] = None,
        add_to: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``conv``'s convolution (its geometry, the given weight and bias) of x (B, C, H, W), added to the map
    ``add_to`` if given (in place: its memory takes the sum, which is returned), then ``gelu``, in one oneDNN call:
    the sum and the activation run in the convolution's epilogue instead of as passes of their own. The weight and
    bias are cast to ``x``'s dtype."""
    weight, bias = weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    activation, algorithm = ('gelu', gelu.approximate) if gelu is not None else (None, None)
    if add_to is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, activation or 'none', [], algorithm)
    return torch.ops.mkldnn._convolution_pointwise_.binary(  # (the out-of-place variant adds in a separate pass)
        add_to, x, weight, bias, *geometry, 'add', 1., activation, [], algorithm)


def batch_norm_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as a per-channel multiply-add: bn(x) = x * scale + shift, both (C,)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift



class OneDnnLinear(torch.autograd.Function):
    """x @ weight.T + bias with oneDNN's linear in the forward pass; in the backward pass the input gradient is
    oneDNN's linear too, grad_out @ weight as a product with the transposed weight (a copy of the small weight). MKL's
    ``mm`` for it ran 1.1-1.4x slower on this project's Zen 4 machine (2 cores, alternating calls: 9.2 against 6.7 ms
    for 3136 x 768 x 192, 9.1 against 7.2 for 3136 x 192 x 768); for the weight gradient, whose reduction runs over
    the tokens, MKL's ``mm`` is the faster one (oneDNN needs both operands transposed). Training steps against MKL's
    ``mm`` for the input gradient (batch 16, alternating in-process rounds): FAN-T-ViT 1.03-1.04x, FAN-T-Hybrid 1.09x,
    FAN-Swin-T 1.06x (``vs_official_zen4/inprocess_ab_2026-12-01.csv`` in ``benchmarks/results/lab_notebook.csv``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = onednn_linear(grad_out, weight.t().contiguous(), None).view(x.shape) if need_x else None
        grad_weight = None
        if need_weight:  # as the product whose rows are the longer side (fc2's, 768 x 192: 5.1 ms against 6.3)
            x = x.reshape(-1, x.shape[-1])
            grad_weight = (x.t() @ grad_out).t() if x.shape[1] > grad_out.shape[1] else grad_out.t() @ x
        grad_bias = grad_out.sum(0) if need_bias else None
        return grad_x, grad_weight, grad_bias



class GeluMlpInChunks(torch.autograd.Function):
    """fc2(GELU(fc1(x))) for tokens x (..., C) in chunks of rows of at most ``TRAINING_CHUNK_BYTES`` of hidden values.

    Keeps only the fc1 outputs (one tensor per chunk) for the backward pass, which recomputes each chunk's GELU output
    for fc2's weight gradient. The weight gradients are summed over the chunks; the values equal the unchunked
    computation up to float32 rounding. The forward products and the input gradients are oneDNN's linear (with the
    weights transposed once per backward pass), the weight gradients MKL's ``addmm_`` (as in ``OneDnnLinear``): on
    AMD CPUs MKL runs its AVX2 kernels, and oneDNN's products of these shapes ran 2.0-2.3x faster on a Zen 5 machine
    (2 cores: 50176 x 128 x 512 in 17 against 38-41 ms).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        rows = max(1, TRAINING_CHUNK_BYTES // (w1.shape[0] * x.element_size()))
        out = tokens.new_empty(tokens.shape[0], w2.shape[0])
        hidden = []
        for start in range(0, tokens.shape[0], rows):
            h = onednn_linear(tokens[start:start + rows], w1, b1)
            hidden.append(h)
            out[start:start + rows] = onednn_linear(F.gelu(h, approximate=approximate), w2, b2)
        ctx.rows, ctx.approximate, ctx.in_shape = rows, approximate, x.shape
        ctx.save_for_backward(tokens, w1, b1, w2, b2, *hidden)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tokens, w1, b1, w2, b2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_b1, need_b2 = need_b1 and b1 is not None, need_b2 and b2 is not None
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(tokens) if need_x else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = torch.zeros_like(b1) if need_b1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        # the input gradients as oneDNN products (see the class): the weights transposed once
        w2_t = w2.t().contiguous() if need_x or need_w1 or need_b1 else None
        w1_t = w1.t().contiguous() if need_x else None
        for index, h in enumerate(hidden):
            rows = slice(index * ctx.rows, index * ctx.rows + h.shape[0])
            g = grad_out[rows]
            a = F.gelu(h, approximate=ctx.approximate)
            if need_w2:
                grad_w2.addmm_(g.t(), a)
            if need_x or need_w1 or need_b1:
                grad_h = onednn_linear(g, w2_t, None)
                torch.ops.aten.gelu_backward.grad_input(grad_h, h, approximate=ctx.approximate, grad_input=grad_h)
                if need_x:
                    grad_x[rows] = onednn_linear(grad_h, w1_t, None)
                if need_w1:
                    grad_w1.addmm_(grad_h.t(), tokens[rows])
                if need_b1:
                    grad_b1 += grad_h.sum(0)
        grad_b2 = grad_out.sum(0) if need_b2 else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.in_shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None



def remove_padding_taps(out: torch.Tensor, taps: torch.Tensor) -> None:
    """Subtract in place from the border pixels of ``out`` (B, C, H, W), the output of a 3x3 stride-1 conv with zero
    padding 1 whose bias holds all nine ``taps`` (C, 3, 3), the taps that fall on the padding there (kernel row 0 on
    the top row, row 2 on the bottom one, the same for columns; the corner taps, taken twice, are added back).
    Works on the (B, H, W, C) view, contiguous for a channels-last map, with contiguous per-channel operands in
    ``out``'s dtype, so that each pass broadcasts along the contiguous dim (with strided operands the same passes took
    3.5x longer in float32, 12x in bfloat16)."""
    rows = taps.sum(2).t().contiguous().to(out.dtype)  # (3, C): sums over kernel rows
    cols = taps.sum(1).t().contiguous().to(out.dtype)  # (3, C): over kernel columns
    corners = taps.permute(1, 2, 0).contiguous().to(out.dtype)  # (3, 3, C)
    pixels = _nhwc(out)
    pixels[:, 0].sub_(rows[0])
    pixels[:, -1].sub_(rows[2])
    pixels[:, :, 0].sub_(cols[0])
    pixels[:, :, -1].sub_(cols[2])
    for u, i in ((0, 0), (2, -1)):
        for v, j in ((0, 0), (2, -1)):
            pixels[:, i, j].add_(corners[u, v])


class ConvGeluNormConv(torch.autograd.Function):
    """The mixer in training, conv1 -> GELU -> BatchNorm on batch statistics -> conv2, on a map x (B, C, H, W), with
    the fewest new hidden-width maps: the forward pass keeps only conv1's input and output (the GELU input) and the
    batch statistics, and normalises the GELU output in place; the backward pass recomputes the GELU output, turns
    conv2's input gradient into the GELU input gradient in place, and rebuilds the norm output in place for conv2's
    weight gradient. Two new maps per pass instead of three and five: on the CPU a new map above glibc's mmap
    threshold (32 MiB) is fresh memory to page in, which costs more than the arithmetic on it. Each depthwise conv's
    input gradient is the forward conv of its output gradient with the kernel flipped (``_conv_input_grad``). Same
    values and gradients as autograd on the reference ops; the running statistics are updated once, as
    ``nn.BatchNorm2d`` does. With ``add_input`` the output is x + the mixer's output, and x's gradient takes the
    output gradient in place (instead of autograd summing the two gradient maps into a new one). A conv1 output of at
    least ``RECOMPUTE_CONV_BYTES`` (FAN-Swin's first two stages: 77 and 39 MB per block at batch 16) is not kept but
    recomputed from x in the backward pass: one depthwise conv per block for 80-170 MiB less peak memory in a
    FAN-Swin-T step at batch 16 (fresh processes, step time within noise)."""

    @staticmethod
    def forward(ctx, x, w1, b1, bn_weight, bn_bias, w2, b2, mixer: nn.Module, add_input: bool):
        bn = mixer.bn
        bn.num_batches_tracked.add_(1)
        momentum = 1. / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum  # None: plain average
        y = F.conv2d(x, w1, b1, padding=mixer.conv1.padding[0], groups=x.shape[1])
        a = _nhwc(F.gelu(_nhwc(y), approximate=mixer.act.approximate), inverse=True)
        # in place: training BatchNorm reads all of its input for the statistics before it writes any output
        normed, mean, invstd = torch.ops.aten.native_batch_norm.out(
            a, bn_weight, bn_bias, bn.running_mean, bn.running_var, True, momentum, bn.eps,
            out=a, save_mean=y.new_empty(0), save_invstd=y.new_empty(0))
        ctx.mixer, ctx.add_input = mixer, add_input
        kept = y if y.numel() * y.element_size() < RECOMPUTE_CONV_BYTES else None  # else recomputed from x
        ctx.save_for_backward(x, kept, w1, b1, bn_weight, bn_bias, w2, mean, invstd)
        out = F.conv2d(normed, w2, b2, padding=mixer.conv1.padding[0], groups=y.shape[1])
        return out.add_(x) if add_input else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, w1, b1, bn_weight, bn_bias, w2, mean, invstd = ctx.saved_tensors
        mixer = ctx.mixer
        C = w1.shape[0]
        if y is None:
            y = F.conv2d(x, w1, b1, padding=mixer.conv1.padding[0], groups=C)
        need_x, need_w1, need_b1, need_bn_weight, need_bn_bias, need_w2, need_b2 = ctx.needs_input_grad[:7]
        need_bn_weight, need_bn_bias = need_bn_weight and bn_weight is not None, need_bn_bias and bn_bias is not None
        need_y = need_x or need_w1 or need_b1
        approximate = mixer.act.approximate
        conv = ([C], [1, 1], [mixer.conv1.padding[0]] * 2, [1, 1], False, [0, 0], C)  # the depthwise convs' geometry

        scale = invstd if bn_weight is None else invstd * bn_weight  # the norm's per-channel factor
        # element-wise passes on (B, H, W, C) views (``_nhwc``), with per-channel operands (C,)
        a = F.gelu(_nhwc(y), approximate=approximate)
        grad_x = grad_w1 = grad_b1 = grad_bn_weight = grad_bn_bias = grad_w2 = grad_b2 = None
        if need_y or need_bn_weight or need_bn_bias:
            grad_normed = _conv_input_grad(grad_out, w2, mixer.conv1.padding[0])
            # per channel: sum of g * xhat (the norm weight's gradient) and of g (the bias'), xhat = (a - mean) * invstd
            _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_normed, _nhwc(a, inverse=True), bn_weight, None, None, mean, invstd, True, mixer.bn.eps,
                [False, True, True])
            grad_bn_weight = sum_g_xhat if need_bn_weight else None
            grad_bn_bias = sum_g if need_bn_bias else None
            if need_y:
                # grad_a = scale * (g - mean(g) - xhat * mean(g * xhat)), in grad_normed's memory, in two passes:
                # g * scale + (per-channel constant), then + a * (per-channel factor)
                n = y.numel() // C
                g = _nhwc(grad_normed)
                grad_a = torch.addcmul(scale * (invstd * mean * sum_g_xhat - sum_g) / n, g, scale, out=g)
                grad_a.addcmul_(a, -scale * invstd * sum_g_xhat / n)
                grad_y = torch.ops.aten.gelu_backward.grad_input(
                    grad_a, _nhwc(y), approximate=approximate, grad_input=grad_a)
                grad_y = _nhwc(grad_y, inverse=True)
                if need_x:
                    grad_x = _conv_input_grad(grad_y, w1, mixer.conv1.padding[0])
                    if ctx.add_input:
                        grad_x.add_(grad_out)
                if need_w1 or need_b1:
                    _, grad_w1, grad_b1 = torch.ops.aten.convolution_backward(
                        grad_y, x, w1, *conv, [False, need_w1, need_b1])
        if need_w2:  # conv2's weight gradient reads its input, the norm output: rebuilt from a in place
            shift = -mean * scale if bn_bias is None else bn_bias - mean * scale
            normed = _nhwc(torch.addcmul(shift, a, scale, out=a), inverse=True)
            _, grad_w2, grad_b2 = torch.ops.aten.convolution_backward(
                grad_out, normed, w2, *conv, [False, True, need_b2])
        elif need_b2:
            grad_b2 = grad_out.sum((0, 2, 3))
        return grad_x, grad_w1, grad_b1, grad_bn_weight, grad_bn_bias, grad_w2, grad_b2, None, None


def _nhwc(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The (B, H, W, C) view of a map x (B, C, H, W), or with ``inverse`` the other way. For a channels-last map the
    view is contiguous: element-wise passes over it take the contiguous loop (GELU on the (B, C, H, W) view of a
    channels-last 16 x 768 x 14 x 14 map: 0.85-1.06 ms, on this view 0.57 ms, 2 cores) and per-channel operands (C,)
    broadcast along the contiguous dim."""
    return x.permute(0, 3, 1, 2) if inverse else x.permute(0, 2, 3, 1)


def _conv_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """The input gradient of a depthwise, stride-1 conv with odd kernel ``weight`` (C, 1, k, k) and zero padding
    k // 2, for its output gradient (B, C, H, W): the forward conv of the gradient with the kernel flipped in both
    directions. oneDNN's forward depthwise kernel is the faster one: in a FAN-T-ViT training step (batch 16, 2 cores)
    conv1's backward took 2.7 ms as one call, 1.1 ms for the flipped conv plus 1.2 ms for the weight gradient."""
    return F.conv2d(grad_out, weight.flip(2, 3), padding=padding, groups=weight.shape[0])



class DepthwiseConvTraining(torch.autograd.Function):
    """A depthwise, stride-1 conv with padding k // 2 of x (B, C, H, W) by weight (C, 1, k, k), whose backward pass
    takes the input gradient as the forward conv of the output gradient with the kernel flipped
    (``_conv_input_grad``) and the weight gradient as a forward depthwise conv with the roles swapped
    (``depthwise_weight_grad``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        padding = weight.shape[-1] // 2
        grad_x = _conv_input_grad(grad_out, weight, padding) if need_x else None
        grad_weight = depthwise_weight_grad(x, grad_out, weight.shape[-1]) if need_weight else None
        grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_weight, grad_bias


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The weight gradient (C, 1, k, k) of a depthwise, stride-1 conv with odd kernel k and zero padding k // 2, for
    its input x and output gradient (B, C, H, W): a forward depthwise conv of the B * C input planes, each with its
    output-gradient plane as the kernel, giving per-image gradients (B * C, k, k), summed over the images."""
    B, C, H, W = x.shape
    planes = x.contiguous().view(1, B * C, H, W)
    kernels = grad_out.contiguous().view(B * C, 1, H, W)
    per_image = F.conv2d(planes, kernels, padding=kernel_size // 2, groups=B * C)  # (1, B * C, k, k)
    return per_image.view(B, C, 1, kernel_size, kernel_size).sum(0)



class HeadwiseAttention(torch.autograd.Function):
    """Softmax attention, q (B, N, C) against keys and values kv (B, N, 2C) (the ``kv`` projection: keys then values,
    each head's d channels together) -> (B, N, C), scale d^-0.5. Head by head on strided views of the projections, so
    that neither direction copies them into a (B, h, N, d) layout; with autograd the attention probabilities (B, N, N)
    per head are kept for the backward pass, which then takes four products per head instead of the five of a
    flash-attention backward that recomputes them. On 2 CPU cores (Zen 4, float32) a FAN-T layer's attention took
    13.6-14.0 ms forward and backward against 17.1-19.4 ms for SDPA; from about 784 tokens on SDPA is faster
    (``HEADWISE_MAX_TOKENS``). Without autograd one probability buffer serves every head."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, num_heads: int) -> torch.Tensor:
        B, N, C = q.shape
        d = C // num_heads
        keep = any(ctx.needs_input_grad[:2])
        logits_in = q.new_empty(1, 1, 1).expand(B, N, N)  # baddbmm's added input, ignored with beta 0
        out, probs = torch.empty_like(q), []
        p = None
        for i in range(num_heads):
            k, v = _head(kv, i, d), _head(kv, num_heads + i, d)
            p = torch.baddbmm(logits_in, _head(q, i, d), k.transpose(1, 2), beta=0, alpha=d ** -0.5,
                              out=None if keep or p is None else p)
            torch.ops.aten._softmax.out(p, -1, False, out=p)  # in place, row by row
            _head(out, i, d).copy_(torch.bmm(p, v))
            if keep:
                probs.append(p)
        ctx.num_heads = num_heads
        ctx.save_for_backward(q, kv, *probs)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, kv, *probs = ctx.saved_tensors
        h = ctx.num_heads
        d = q.shape[-1] // h
        need_q, need_kv = ctx.needs_input_grad[:2]
        grad_q = torch.empty_like(q) if need_q else None
        grad_kv = torch.empty_like(kv) if need_kv else None
        for i, p in enumerate(probs):
            g = _head(grad_out, i, d)
            if need_kv:
                _head(grad_kv, h + i, d).copy_(torch.bmm(p.transpose(1, 2), g))  # values: p^T g
            grad_logits = torch.bmm(g, _head(kv, h + i, d).transpose(1, 2))  # g v^T, then through the softmax:
            torch.ops.aten._softmax_backward_data.out(grad_logits, p, -1, p.dtype, grad_input=grad_logits)
            if need_q:
                torch.mul(torch.bmm(grad_logits, _head(kv, i, d)), d ** -0.5, out=_head(grad_q, i, d))
            if need_kv:
                torch.mul(torch.bmm(grad_logits.transpose(1, 2), _head(q, i, d)), d ** -0.5, out=_head(grad_kv, i, d))
        return grad_q, grad_kv, None


def _head(x: torch.Tensor, i: int, d: int) -> torch.Tensor:
    """The i-th group of d channels of x (B, N, *): a (B, N, d) strided view."""
    return x[..., i * d:(i + 1) * d]
