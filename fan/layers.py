""" FAN building blocks: token self-attention, efficient channel attention, depthwise-conv MLP, FAN block.

Paper: `Understanding The Robustness in Vision Transformers` - https://arxiv.org/abs/2204.12451

Parameter names follow the official FAN checkpoints (`attn.q`, `attn.kv`, `mlp.mlp_v.dwconv.conv1`, ...), so the
released weights load without renaming. The layers were written from the paper and a description of the official
computation; see the docstrings for the quirks that checkpoint parity depends on.

Shapes: B batch, N = H * W patch tokens, C channels, h heads, d = C / h channels per head.
"""
import ctypes
import os
import platform
import sys
import weakref
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final
from torch.utils.weak import WeakIdKeyDictionary

from timm.layers import DropPath, LayerNorm, Mlp, trunc_normal_, use_fused_attn

__all__ = [
    'Linear', 'OneDnnLinear', 'DepthwiseConv2d', 'depthwise_weight_grad', 'DepthwiseConvMixer', 'DwConvMlp',
    'TokenMixing', 'HeadwiseAttention', 'ChannelAttention', 'SeMlp', 'FanBlock',
    'OverlapPatchEmbed', 'tokens_to_map', 'map_to_tokens', 'run_in_batch_chunks', 'TokenChunkedMlp',
    'cpu_fast_path_dtype', 'onednn_inference', 'onednn_conv', 'onednn_linear', 'use_fan_linear', 'bf16_inference_input',
    'fold_out_scale', 'batch_norm_scale_shift', 'tune_malloc',
]


class Linear(nn.Linear):
    """``nn.Linear`` with fast paths on the CPU: oneDNN's linear, which adds the bias in the matrix product's
    epilogue. ``F.linear`` there first copies the broadcast bias into the output (an extra, slow pass over it), and the
    FAN layers' products are memory-bound enough for that to show (the fast path measured 1.3-1.8x faster on
    3136 x 192 x 768 products in inference, 2 cores; the copies were 3 % of a FAN-T-ViT training step). With autograd
    the forward product goes through ``OneDnnLinear``. Under CPU autocast to bfloat16 without autograd the product runs
    in bfloat16 the same way (autocast's ``F.linear`` copies the bias as well). Scripting, tracing, ``torch.compile``,
    export, other autocast and layers without bias take ``F.linear``; the outputs agree to float32 (bfloat16) rounding.
    ``out_scale`` (out_features,) multiplies the output, folded into the weight and bias: a layer scale that costs no
    pass over the output and keeps no output for its gradient.

    The bfloat16 product takes the weight rounded to bfloat16 and reordered into oneDNN's blocked layout once, not on
    every call: 1.1-1.3x faster products for FAN-T's 192-wide layers (3136 tokens, 2 cores, Zen 4: 192 -> 192
    0.73 -> 0.57 ms, 192 -> 384 1.42 -> 1.14, 192 -> 768 2.6-2.9 -> 2.4; 768 -> 192 unchanged). The packed weight is
    kept beside the layer (not in its state or its copies) until the weight, bias or ``out_scale`` changes (another
    tensor, storage or version) or the layer is put in training mode; writes through ``.data``, which bypass the
    version counter, need ``train()`` (or a new layer) before the next bfloat16 inference.
    """

    def forward(self, x: torch.Tensor, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, *fold_out_scale(self.weight, self.bias, out_scale))
        dtype = self._fast_path_dtype(x)
        if dtype is None:
            return F.linear(x, *fold_out_scale(self.weight, self.bias, out_scale))
        if _needs_autograd(x, self):  # (float32 only)
            return OneDnnLinear.apply(x, *fold_out_scale(self.weight, self.bias, out_scale))
        return self.inference(x.to(dtype), out_scale)

    @torch.jit.ignore
    def inference(
            self,
            x: torch.Tensor,
            out_scale: Optional[torch.Tensor] = None,
            gelu: Optional[nn.GELU] = None,
    ) -> torch.Tensor:
        """The oneDNN product without autograd of x (..., in_features) in its dtype, float32 or bfloat16 (with the
        packed weight), times ``out_scale`` if given, then ``gelu`` if given, in one call -> (..., out_features)."""
        packed = self._packed_bf16(out_scale, x.numel() // x.shape[-1]) if x.dtype == torch.bfloat16 else None
        weight, bias = packed or fold_out_scale(self.weight, self.bias, out_scale)
        return onednn_linear(x, weight, bias, gelu=gelu)

    @torch.jit.ignore
    def _packed_bf16(self, out_scale: Optional[torch.Tensor], rows: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The bfloat16 weight in oneDNN's layout and bias, with ``out_scale`` folded in, packed for ``rows`` input rows
        on the first call and then reused; None for inference tensors (no version counter to watch)."""
        tensors = (self.weight, self.bias) if out_scale is None else (self.weight, self.bias, out_scale)
        if any(t.is_inference() for t in tensors):
            return None
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = _PACKED_BF16_WEIGHTS.get(self)
        if cached is None or cached[0] != key or cached[1]() is not out_scale:  # (a scale made per call: repacked)
            weight, bias = fold_out_scale(self.weight, self.bias, out_scale)
            scale_ref = (lambda: None) if out_scale is None else weakref.ref(out_scale)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), rows)
            cached = key, scale_ref, packed, bias.bfloat16()
            _PACKED_BF16_WEIGHTS[self] = cached
        return cached[2], cached[3]

    def train(self, mode: bool = True) -> 'Linear':
        """Training mode also drops the packed bfloat16 weight (its memory; any weight written through ``.data``)."""
        if mode:
            _PACKED_BF16_WEIGHTS.pop(self, None)
        return super().train(mode)

    @torch.jit.ignore
    def _fast_path_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype of the oneDNN product for ``x``, or None where ``F.linear`` runs: bfloat16 only without
        autograd. (``x`` is checked before the parameters: under FX tracing both are proxies.)"""
        dtype = cpu_fast_path_dtype(x) if _MKLDNN_LINEAR and self.bias is not None else None
        if dtype is None or self.weight.dtype != torch.float32:
            return None
        return dtype if dtype == torch.float32 or not _needs_autograd(x, self) else None


# Linear -> (storage and versions it was packed from, weak reference to the out_scale, packed weight, bias): see Linear
_PACKED_BF16_WEIGHTS = WeakIdKeyDictionary()


class OneDnnLinear(torch.autograd.Function):
    """x @ weight.T + bias with oneDNN's linear in the forward pass; in the backward pass the input gradient is
    oneDNN's linear too, grad_out @ weight as a product with the transposed weight (a copy of the small weight). MKL's
    ``mm`` for it ran 1.1-1.4x slower on this project's Zen 4 machine (2 cores, alternating calls: 9.2 against 6.7 ms
    for 3136 x 768 x 192, 9.1 against 7.2 for 3136 x 192 x 768); for the weight gradient, whose reduction runs over
    the tokens, MKL's ``mm`` is the faster one (oneDNN needs both operands transposed). Training steps against MKL's
    ``mm`` for the input gradient (batch 16, alternating in-process rounds): FAN-T-ViT 1.03-1.04x, FAN-T-Hybrid 1.09x,
    FAN-Swin-T 1.06x (``benchmarks/results/vs_official_zen4/inprocess_ab_2026-12-01.csv``)."""

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


def _plain_eager(x: torch.Tensor) -> bool:
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
    if not _plain_eager(x) or x.device.type != 'cpu':
        return None
    if not torch.is_autocast_enabled('cpu'):
        return torch.float32 if x.dtype == torch.float32 else None
    autocast_bf16 = torch.get_autocast_dtype('cpu') == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return torch.bfloat16 if autocast_bf16 else None


def _needs_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """True when autograd records the module's computation on ``x``: grad mode on, and ``x`` or a parameter needs it."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def bf16_inference_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x cast to bfloat16 under CPU autocast to bfloat16 without autograd, else x: one cast for a module that hands x
    to several products, each of which would cast it again."""
    if cpu_fast_path_dtype(x) == torch.bfloat16 and not _needs_autograd(x, module):
        return x.to(torch.bfloat16)
    return x


def onednn_inference(x: torch.Tensor, module: nn.Module) -> Optional[torch.dtype]:
    """The dtype ``module``'s oneDNN inference path computes in for ``x``, or None where the reference path runs:
    float32 for plain eager float32 on the CPU without autocast, bfloat16 under CPU autocast to bfloat16 (``x`` is cast
    to it); eval mode and no autograd in both."""
    dtype = cpu_fast_path_dtype(x) if _MKLDNN_CONV and not module.training else None
    return None if dtype is None or _needs_autograd(x, module) else dtype


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


def use_fan_linear(module: nn.Module) -> None:
    """Replaces every plain ``nn.Linear`` with bias below ``module`` (timm's attention and MLP layers) by
    ``Linear`` holding the same parameters: the same names and values, with its CPU fast paths."""
    for name, child in module.named_children():
        if type(child) is nn.Linear and child.bias is not None:
            fast = Linear(child.in_features, child.out_features, device='meta')
            fast.weight, fast.bias = child.weight, child.bias
            setattr(module, name, fast)
        else:
            use_fan_linear(child)


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


_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
_MKLDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
_FUNCTORCH_ACTIVE = getattr(torch._C, '_are_functorch_transforms_active', lambda: False)


INFERENCE_CHUNK_BYTES = 128 * 2 ** 20  # largest activation of one batch chunk in CPU inference


def run_in_batch_chunks(
        features: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        activation_per_pixel: float,
        training: bool,
) -> torch.Tensor:
    """``features(x)`` for an image batch ``x`` (B, C, H, W), run in chunks of images for CPU inference.

    In eval mode without autograd the images are independent, so on the CPU the batch is split (``x.tensor_split``)
    into chunks whose largest activation (``activation_per_pixel`` values per input pixel, counted in the dtype the
    layers compute in: bfloat16 under CPU autocast) stays within ``INFERENCE_CHUNK_BYTES``,
    and the chunks' outputs are concatenated: the same values, with the activations' memory bounded for big batches.
    Otherwise ``features(x)``. The first CPU forward pass, training ones included, also tunes glibc's malloc
    (``tune_malloc``). The budget was 20 MiB while glibc's default malloc paged every large activation in afresh
    (chunks then measured 1.1-1.25x faster for FAN-Hybrid and FAN-Swin at batch 16); with the malloc tuned, the
    whole batch of 16 measured faster (alternating in-process rounds, 20 MiB -> no chunks: FAN-T-Hybrid 20.6 -> 22.7
    img/s in float32 and 34.5 -> 37.6 in bfloat16, FAN-Swin-T 14.4 -> 14.8 and 22.7 -> 24.0), hence 128 MiB, which
    runs batch 16 whole for every tiny and small model.
    """
    if not _plain_eager(x) or x.device.type != 'cpu':
        return features(x)
    tune_malloc()
    if training or torch.is_grad_enabled() or x.ndim != 4:
        return features(x)
    dtype = cpu_fast_path_dtype(x) or x.dtype
    per_image = activation_per_pixel * x.shape[-2] * x.shape[-1] * dtype.itemsize
    images_per_chunk = max(1, int(INFERENCE_CHUNK_BYTES // per_image))
    chunks = -(-x.shape[0] // images_per_chunk)
    if chunks <= 1:
        return features(x)
    return torch.cat([features(images) for images in x.tensor_split(chunks)])


_GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_malloc_tuned = False


def tune_malloc() -> None:
    """Once per process, with glibc and unless the environment sets ``FAN_TUNE_MALLOC=0``: glibc's malloc keeps freed
    memory for the next allocation instead of handing it back to the system. Its heap top is never trimmed
    (``M_TRIM_THRESHOLD`` -1) and large blocks come from the heap too, not from mmaps of their own (``M_MMAP_MAX`` 0).

    By default glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmaps, unmaps
    them when freed, and trims freed memory at the top of its heap: a forward or training pass that frees its
    activations and allocates them again on the next batch pages in every map afresh, 4 KiB per page fault (about
    1-2.7 us each on the project's VM, more than the arithmetic on the page). Page faults per batch of 16 on 2 cores,
    default -> tuned, and the speed-up in alternating in-process rounds: FAN-T-ViT training 12-55 thousand -> under
    300 (1.02x), FAN-T-Hybrid training 138 thousand -> 0 (1.04x), FAN-Swin-T training 162 thousand -> 0 (1.11x) and
    inference 39-47 thousand -> 0 (12.8 -> 13.9 img/s). The process then keeps its peak heap mapped, as jemalloc and
    tcmalloc do (``malloc_trim(0)`` gives the free part back); FAN-Swin-T's peak resident memory in training rose by
    2-5 % (heap fragments that the mmaps did not leave; ``RECOMPUTE_CONV_BYTES`` takes it back), then stayed flat
    over 60 steps. The models' CPU forward passes call it (``run_in_batch_chunks``).
    """
    global _malloc_tuned
    if _GLIBC and not _malloc_tuned:
        _malloc_tuned = True
        if os.environ.get('FAN_TUNE_MALLOC', '1') != '0':
            libc = ctypes.CDLL(None)
            libc.mallopt(_M_TRIM_THRESHOLD, -1)
            libc.mallopt(_M_MMAP_MAX, 0)


RECOMPUTE_CONV_BYTES = 32 * 2 ** 20  # training: mixer conv1 outputs this large are recomputed, not kept (memory)
TRAINING_CHUNK_BYTES = 8 * 2 ** 20  # hidden activations of one chunk of tokens (TokenChunkedMlp, CPU training)


class TokenChunkedMlp(Mlp):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2 over the last dim, same parameters and outputs) with CPU fast paths, and a
    per-channel ``out_scale`` (out_features,) folded into fc2's weight and bias (a layer scale that costs no pass over
    the output). fc1 and fc2 are ``Linear`` layers.

    The MLPs of the hybrids' ConvNeXt stages have the largest maps of any FAN model: 4x the channels at stride 4,
    103 MB per map at batch 16 and 224 px. CPU inference (float32, or bfloat16 under autocast) computes the GELU in
    fc1's epilogue (``onednn_linear``): one pass over the hidden map instead of three (the bias copy, the product, the
    GELU); 1.9x faster on 3 x 56 x 56 x 128 tokens in float32, 2 cores. The CPU training pass runs the tokens in
    chunks (``GeluMlpInChunks``) whose hidden maps (``TRAINING_CHUNK_BYTES``) are reused from the heap and stay in
    cache, the GELU output recomputed in the backward pass instead of kept: 1.12-1.19x faster FAN-T-Hybrid training
    steps (batch 16, 2 cores), 4 maps of 103 MB fewer per block. GPUs, dropout, other autocast, tracing and export take
    timm's computation.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        use_fan_linear(self)

    def forward(self, x: torch.Tensor, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (..., in_features) -> (..., out_features), times ``out_scale`` if given."""
        if not torch.jit.is_scripting():
            dtype = self._fused_inference_dtype(x)
            if dtype is not None:
                return self.fc2(self.fc1.inference(x.to(dtype), gelu=self.act), out_scale)
            if self._in_chunks(x):
                return self._forward_in_chunks(x, out_scale)
        x = self.norm(self.drop1(self.act(self.fc1(x))))  # timm's Mlp.forward
        return self.drop2(self.fc2(x, out_scale))

    @torch.jit.ignore
    def _forward_in_chunks(self, x: torch.Tensor, out_scale: Optional[torch.Tensor]) -> torch.Tensor:
        w2, b2 = fold_out_scale(self.fc2.weight, self.fc2.bias, out_scale)
        return GeluMlpInChunks.apply(x, self.fc1.weight, self.fc1.bias, w2, b2, self.act.approximate)

    @torch.jit.ignore
    def _gelu_between_linears(self) -> bool:
        return (isinstance(self.act, nn.GELU) and isinstance(self.norm, nn.Identity)
                and not (self.training and (self.drop1.p > 0 or self.drop2.p > 0)))

    @torch.jit.ignore
    def _fused_inference_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype of the inference path with the GELU in fc1's epilogue for ``x`` (fc1's oneDNN product without
        autograd), or None."""
        dtype = self.fc1._fast_path_dtype(x)
        return dtype if dtype is not None and not _needs_autograd(x, self) and self._gelu_between_linears() else None

    @torch.jit.ignore
    def _in_chunks(self, x: torch.Tensor) -> bool:
        return (
            _MKLDNN_LINEAR
            and _plain_eager(x)
            and x.device.type == 'cpu'
            and _needs_autograd(x, self)
            and self._gelu_between_linears()
            and x.dtype == self.fc1.weight.dtype
            and not torch.is_autocast_enabled('cpu')
        )


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


def tokens_to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) map, as a channels-last strided view (no copy)."""
    return x.transpose(1, 2).unflatten(2, (H, W))


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, N, C) tokens (no copy for a channels-last map)."""
    return x.flatten(2).transpose(1, 2)


class DepthwiseConvMixer(nn.Module):
    """Local token mixing inside the FAN MLP: depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv.

    Works on tokens (B, N, C) with their grid (H, W) and returns tokens of the same shape. The convolutions run on a
    channels-last view of the tokens, so neither direction copies the data.
    """

    def __init__(
            self,
            dim: int,
            act_layer: Type[nn.Module] = nn.GELU,
            kernel_size: int = 3,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.padding = padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim, **dd)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim, **dd)

    def forward(
            self,
            x: torch.Tensor,
            H: int,
            W: int,
            scale: Optional[torch.Tensor] = None,
            add_input: bool = False,
    ) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C); ``scale`` (C,) multiplies the output channels, folded into conv2's weights
        so that training does not keep the unscaled output for the gradient of ``scale``; with ``add_input`` the
        output is x + scale * mixer(x), the sum taken in place on conv2's output map (whose gradient needs neither),
        not on the token view of it, which autograd would have to rebuild in the backward pass (copying the whole
        gradient twice). In CPU inference conv2 adds its output to x in place instead: x's memory is overwritten.

        Two eager-mode paths give the same values as the reference computation with fewer passes over memory: CPU
        inference (float32, or bfloat16 under autocast) runs two oneDNN convolutions with GELU, norm and the sum
        folded in (``_inference``); in training, the GELU and norm outputs are recomputed in the backward pass
        instead of kept (``ConvGeluNormConv``)."""
        w2, b2 = fold_out_scale(self.conv2.weight, self.conv2.bias, scale)
        x = tokens_to_map(x, H, W)
        if not torch.jit.is_scripting():
            inference_dtype = self._inference_dtype(x)
            if inference_dtype is not None:
                return map_to_tokens(self._inference(x.to(inference_dtype), w2, b2, add_input))
            if self._recomputes(x):
                return map_to_tokens(self._recompute(x, w2, b2, add_input))
        out = self._reference(x, w2, b2)
        return map_to_tokens(out.add_(x) if add_input else out)

    @torch.jit.ignore
    def _inference_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype of the fused inference path for ``x`` (``onednn_inference``), or None."""
        foldable = self.bn.running_var is not None and self.conv1.kernel_size == self.conv2.kernel_size == (3, 3)
        return onednn_inference(x, self) if foldable and isinstance(self.act, nn.GELU) else None

    @torch.jit.ignore
    def _recomputes(self, x: torch.Tensor) -> bool:
        """True when training takes ``ConvGeluNormConv``."""
        return (_plain_eager(x) and _needs_autograd(x, self) and self.bn.training and self.bn.track_running_stats
                and isinstance(self.act, nn.GELU) and x.dtype == self.conv1.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))

    @torch.jit.ignore
    def _recompute(
            self, x: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor], add_input: bool) -> torch.Tensor:
        conv1, bn = self.conv1, self.bn
        return ConvGeluNormConv.apply(x, conv1.weight, conv1.bias, bn.weight, bn.bias, w2, b2, self, add_input)

    def _reference(self, x: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.bn(self.act(self.conv1(x)))
        return F.conv2d(x, w2, b2, padding=self.padding, groups=x.shape[1])

    @torch.jit.ignore
    def _inference(
            self,
            x: torch.Tensor,
            w2: torch.Tensor,
            b2: Optional[torch.Tensor],
            add_input: bool,
    ) -> torch.Tensor:
        """The reference computation in two oneDNN convolutions: conv1 with the GELU in its epilogue, then conv2
        with the eval-mode BatchNorm folded in, its output added in place to x (B, C, H, W) with ``add_input``.
        Computes in ``x``'s dtype (bfloat16 under autocast: the folded weights are rounded to it after folding).

        conv2(bn(a)) = conv2'(a) for the weights scaled by the norm's factor and a bias that adds the norm's shift
        through every tap: exact inside the image; at the border the taps that fell on conv2's zero padding saw
        zeros, not the shift, and are taken back out (``_remove_padding_taps``)."""
        scale, shift = batch_norm_scale_shift(self.bn)
        shift_taps = w2[:, 0] * shift[:, None, None]  # (C, 3, 3): each tap's share of the shift
        bias = shift_taps.sum((1, 2)) if b2 is None else b2 + shift_taps.sum((1, 2))
        a = onednn_conv(x, self.conv1, self.conv1.weight, self.conv1.bias, gelu=self.act)
        add_to = None
        if add_input:  # (x is no longer needed: conv2 reads a)
            add_to = x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(
                memory_format=torch.channels_last)  # the layout of conv2's output
        x = onednn_conv(a, self.conv2, w2 * scale[:, None, None, None], bias, add_to=add_to)
        _remove_padding_taps(x, shift_taps)
        return x


def _remove_padding_taps(out: torch.Tensor, taps: torch.Tensor) -> None:
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
    def forward(ctx, x, w1, b1, bn_weight, bn_bias, w2, b2, mixer: 'DepthwiseConvMixer', add_input: bool):
        bn = mixer.bn
        bn.num_batches_tracked.add_(1)
        momentum = 1. / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum  # None: plain average
        y = F.conv2d(x, w1, b1, padding=mixer.padding, groups=x.shape[1])
        a = _nhwc(F.gelu(_nhwc(y), approximate=mixer.act.approximate), inverse=True)
        # in place: training BatchNorm reads all of its input for the statistics before it writes any output
        normed, mean, invstd = torch.ops.aten.native_batch_norm.out(
            a, bn_weight, bn_bias, bn.running_mean, bn.running_var, True, momentum, bn.eps,
            out=a, save_mean=y.new_empty(0), save_invstd=y.new_empty(0))
        ctx.mixer, ctx.add_input = mixer, add_input
        kept = y if y.numel() * y.element_size() < RECOMPUTE_CONV_BYTES else None  # else recomputed from x
        ctx.save_for_backward(x, kept, w1, b1, bn_weight, bn_bias, w2, mean, invstd)
        out = F.conv2d(normed, w2, b2, padding=mixer.padding, groups=y.shape[1])
        return out.add_(x) if add_input else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, w1, b1, bn_weight, bn_bias, w2, mean, invstd = ctx.saved_tensors
        mixer = ctx.mixer
        C = w1.shape[0]
        if y is None:
            y = F.conv2d(x, w1, b1, padding=mixer.padding, groups=C)
        need_x, need_w1, need_b1, need_bn_weight, need_bn_bias, need_w2, need_b2 = ctx.needs_input_grad[:7]
        need_bn_weight, need_bn_bias = need_bn_weight and bn_weight is not None, need_bn_bias and bn_bias is not None
        need_y = need_x or need_w1 or need_b1
        approximate = mixer.act.approximate
        conv = ([C], [1, 1], [mixer.padding] * 2, [1, 1], False, [0, 0], C)  # the depthwise convs' geometry

        scale = invstd if bn_weight is None else invstd * bn_weight  # the norm's per-channel factor
        # element-wise passes on (B, H, W, C) views (``_nhwc``), with per-channel operands (C,)
        a = F.gelu(_nhwc(y), approximate=approximate)
        grad_x = grad_w1 = grad_b1 = grad_bn_weight = grad_bn_bias = grad_w2 = grad_b2 = None
        if need_y or need_bn_weight or need_bn_bias:
            grad_normed = _conv_input_grad(grad_out, w2, mixer.padding)
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
                    grad_x = _conv_input_grad(grad_y, w1, mixer.padding)
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


SWAPPED_WEIGHT_GRAD_MIN_KERNEL = 7  # DepthwiseConv2d: smallest kernel whose weight gradient runs as a swapped conv


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise, stride-1 conv with an odd square kernel and zero padding k // 2, map (B, C, H, W) -> (B, C, H, W):
    ``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)`` with the same parameters and outputs, and a faster weight
    gradient in CPU float32 training for kernels of at least ``SWAPPED_WEIGHT_GRAD_MIN_KERNEL`` (ConvNeXt's 7x7).

    oneDNN computes a depthwise weight gradient on channels-last maps with its grouped-conv kernel, which pads every
    channel to a 16 x 16 block: 51-64 ms for a 16 x 128 x 56 x 56 map and a 7x7 kernel on 2 cores (5 GMAC/s).
    ``DepthwiseConvTraining`` computes it as a forward depthwise conv with the roles swapped
    (``depthwise_weight_grad``): 25 ms with the two copies to planar layout, 13 against 36 ms for 16 x 256 x 28 x 28
    (``benchmarks/depthwise_weight_grad.py``). For 3x3 kernels oneDNN's own gradient is the faster one (1.2 against
    7.0 ms for 16 x 768 x 14 x 14)."""

    def __init__(self, dim: int, kernel_size: int = 7, bias: bool = True, device=None, dtype=None) -> None:
        assert kernel_size % 2 == 1, f'kernel_size {kernel_size} must be odd'
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._swaps_weight_grad(x):
                return DepthwiseConvTraining.apply(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)  # (nn.Conv2d's forward; TorchScript has no super())

    @torch.jit.ignore
    def _swaps_weight_grad(self, x: torch.Tensor) -> bool:
        return (_plain_eager(x) and x.device.type == 'cpu' and self.weight.requires_grad and torch.is_grad_enabled()
                and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
                and self.kernel_size[0] >= SWAPPED_WEIGHT_GRAD_MIN_KERNEL)


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


class DwConvMlp(nn.Module):
    """The FAN MLP: fc1 -> (+ gamma * depthwise-conv mixer) -> fc2, on tokens (B, N, C).

    There is no activation after fc1: the only non-linearity is the GELU inside the depthwise mixer. With
    ``residual=True`` (FAN-ViT / Hybrid) the mixer output is added to its input, y = fc1(x) + gamma * mixer(fc1(x));
    FAN-Swin uses ``residual=False``, y = gamma * mixer(fc1(x)). ``gamma`` is a learnable per-channel scale, init 1.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            drop: float = 0.,
            residual: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.residual = residual
        self.fc1 = Linear(in_features, hidden_features, **dd)
        self.dwconv = DepthwiseConvMixer(hidden_features, **dd)
        self.gamma = nn.Parameter(torch.ones(hidden_features, **dd))
        self.fc2 = Linear(hidden_features, in_features, **dd)
        self.drop = nn.Dropout(drop)
        self.apply(_init_mlp_weights)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.residual and not (self.training and self.drop.p > 0):
            mixed = self.dwconv(x, H, W, scale=self.gamma, add_input=True)  # x + gamma * mixer(x), added in place
        else:
            mixed = self.drop(self.dwconv(x, H, W, scale=self.gamma))
            if self.residual:
                mixed = mixed + x
        return self.drop(self.fc2(mixed))


def _init_mlp_weights(m: nn.Module) -> None:
    """FAN MLP init: Linear trunc-normal(0.02), conv normal(0, sqrt(2 / fan_out)), zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0., (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


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


HEADWISE_MAX_TOKENS = 576  # CPU float32: HeadwiseAttention measured faster than SDPA up to here (training)


class TokenMixing(nn.Module):
    """Global multi-head self-attention over the tokens (B, N, C) -> (B, N, C).

    Separate ``q`` and ``kv`` projections (the checkpoint layout), scale d^-0.5, output projection with bias.
    Uses ``F.scaled_dot_product_attention`` unless timm's fused attention is switched off (``TIMM_FUSED_ATTN=0`` or
    ``timm.layers.set_fused_attn(False)`` before the model is built), which FLOP counters need to see the matmuls.
    On the CPU without attention dropout ``HeadwiseAttention`` runs instead in float32 training on at most
    ``HEADWISE_MAX_TOKENS`` tokens (it keeps the probabilities rather than recomputing them) and in bfloat16 autocast
    inference of at least as many images as heads, where its bfloat16 products measured 1.5-1.8x faster than SDPA
    (16 images of 4 heads; 1.1x at 4). With fewer images each of its per-head products is too small, and SDPA, which
    spreads images and heads over the cores, measured faster: 1.4x for 3 images of 8 heads (FAN-T-Hybrid's former
    batch chunks), 2x for one image. (In float32 inference it measured as fast as SDPA: 1.04x FAN-T-ViT in one process,
    0.97x FAN-T-Hybrid in fresh ones.)
    """
    fused_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C), times the per-channel ``out_scale`` (C,) if given (folded into ``proj``)."""
        B, N, C = x.shape
        if not torch.jit.is_scripting():
            x = bf16_inference_input(x, self)
        q, kv = self.q(x), self.kv(x)  # (B, N, C), (B, N, 2C)
        if not torch.jit.is_scripting() and self._headwise(q):
            return self.proj_drop(self.proj(HeadwiseAttention.apply(q, kv, self.num_heads), out_scale))
        q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x, out_scale))

    @torch.jit.ignore
    def _headwise(self, q: torch.Tensor) -> bool:
        """True where ``HeadwiseAttention`` runs for the projected queries q (B, N, C) (see the class docstring)."""
        dtype = cpu_fast_path_dtype(q) if self.fused_attn and (self.attn_drop.p == 0 or not self.training) else None
        if dtype == torch.bfloat16:  # from as many images as heads on (see the class docstring)
            return not q.requires_grad and q.shape[0] >= self.num_heads
        return dtype == torch.float32 and q.requires_grad and q.shape[1] <= HEADWISE_MAX_TOKENS


class ChannelAttention(nn.Module):
    """FAN's efficient channel attention ("attentional channel processing"), tokens (B, N, C) -> (B, N, C).

    Per head and channel c, with an identity key::

        Qs = softmax over tokens of q(x)                           (B, N, h, d)
        ks = mean over the d channels of softmax over tokens of x  (B, N, h)
        A  = sigmoid(sum_n Qs[n, c] * ks[n]) * temperature[head]   (B, h, d)
        out[n, c] = A[c] * LayerNorm(DwConvMlp(x))[n, c]

    The temperature (shape (h, 1, 1), init 1) is a gain applied after the sigmoid; there is no output projection.
    ``norm_v`` uses LayerNorm's default eps 1e-5, as in the released models.

    Under CPU autocast to bfloat16 without autograd the gate is applied in bfloat16, the dtype of the values, so the
    output and with it the residual stream stay in bfloat16, as they are in the stems, the ConvNeXt stages and
    FAN-Swin's last stage (a float32 gate promoted the stream to float32 from the first channel attention on, and
    every later block then cast it back for its products). The golden inputs keep their top-1 class, and the logits
    stay as close to the float32 ones (largest error 0.80 / 0.68 / 0.67 % of the largest logit for FAN-T-ViT / Hybrid /
    Swin, against 0.69 / 0.75 / 0.68 % with the float32 stream); bfloat16 inference 1.04x / 1.015x / 1.056x (medians
    of 30 alternating batches of 16, Zen 5, 2 cores). Training keeps the float32 gate.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            drop: float = 0.,
            mlp_residual: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, **dd))
        self.q = Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.mlp_v = DwConvMlp(dim, int(dim * mlp_ratio), drop=drop, residual=mlp_residual, **dd)
        self.norm_v = nn.LayerNorm(dim, **dd)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample channel weights A (B, C) for tokens x (B, N, C)."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, -1).softmax(dim=1).reshape(B, N, C)  # softmax over tokens per channel
        k = x.reshape(B, N, h, -1).softmax(dim=1).mean(dim=-1)  # (B, N, h): channel mean of softmax over tokens
        # sum over tokens of q[n, c] * k[n, head of c]: all (head, channel) pairs in one batched matmul, then the
        # matching head of each channel (the block diagonal); cheaper than permuting q for a per-head product
        scores = torch.bmm(k.transpose(1, 2), q).reshape(B, h, h, -1).diagonal(dim1=1, dim2=2)  # (B, d, h)
        gate = scores.sigmoid().transpose(1, 2) * self.temperature.squeeze(-1)  # (B, h, d)
        return self.attn_drop(gate).reshape(B, C)

    def forward(self, x: torch.Tensor, H: int, W: int, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, C) with grid (H, W) -> (B, N, C), times the per-channel ``out_scale`` (C,) if given (folded
        into the gate: no pass of its own, no output kept for its gradient)."""
        if not torch.jit.is_scripting():
            x = bf16_inference_input(x, self)  # (for q, the key softmax and fc1)
        gate = self.channel_gate(x)
        if out_scale is not None:
            gate = gate * out_scale
        if not torch.jit.is_scripting():  # bfloat16 inference: the residual stream stays in bfloat16 (see the class)
            gate = bf16_inference_input(gate, self)
        v = self.norm_v(self.mlp_v(x, H, W))
        return v * gate.unsqueeze(1)


class SeMlp(nn.Module):
    """The SE ablation's replacement for the channel attention, tokens (B, N, C) -> (B, N, C).

    The FAN MLP (``mlp_v``, named as in ``ChannelAttention``) followed by squeeze-excite over its output: average over
    tokens -> 1x1 conv C -> C/4 -> ReLU -> 1x1 conv C/4 -> C -> sigmoid channel gate.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop: float = 0.,
            se_ratio: float = 0.25,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.mlp_v = DwConvMlp(dim, int(dim * mlp_ratio), drop=drop, **dd)
        self.se = SqueezeExcite(dim, int(dim * se_ratio), **dd)

    def forward(self, x: torch.Tensor, H: int, W: int, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens (B, N, C) with grid (H, W) -> (B, N, C), times the per-channel ``out_scale`` (C,) if given (folded
        into the squeeze-excite gate)."""
        return map_to_tokens(self.se(tokens_to_map(self.mlp_v(x, H, W), H, W), out_scale))


class SqueezeExcite(nn.Module):
    """Squeeze-excite on a map (B, C, H, W) with checkpoint names ``conv_reduce`` / ``conv_expand``."""

    def __init__(self, dim: int, reduced_dim: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv_reduce = nn.Conv2d(dim, reduced_dim, 1, **dd)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x times its gate (B, C, 1, 1), and times the per-channel ``out_scale`` (C,) if given, in one pass."""
        gate = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()
        return x * (gate * out_scale[:, None, None] if out_scale is not None else gate)


class OverlapPatchEmbed(nn.Module):
    """Strided 3x3 conv between blocks of different widths: tokens (B, H*W, C_in) -> (B, H'*W', C_out), H' = ceil(H/2).

    Followed by LayerNorm with the default eps 1e-5 (as in the released FAN-XLarge hybrid).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1, **dd)
        self.norm = nn.LayerNorm(out_dim, **dd)
        _init_mlp_weights(self.proj)

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(tokens_to_map(x, H, W))
        H, W = x.shape[-2], x.shape[-1]
        return self.norm(map_to_tokens(x)), H, W


class FanBlock(nn.Module):
    """FAN block: x += DropPath(gamma1 * TokenMixing(LN(x))); x += DropPath(gamma2 * Mlp(LN(x), H, W)).

    Tokens (B, N, C) with grid (H, W) in; tokens, H and W out (an optional ``downsample`` changes all three).
    ``mlp_layer`` builds the channel mixer as ``mlp_layer(dim, device=..., dtype=...)`` (bind its other arguments
    with ``functools.partial``): ``ChannelAttention`` in FAN, ``SeMlp`` in the paper's squeeze-excite ablation; it
    is called as ``mlp(x, H, W, out_scale)``. ``gamma1`` / ``gamma2`` are per-channel layer scales initialised to
    ``eta`` (1.0 in every released model), handed to the attention and the channel mixer as their ``out_scale``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Callable[..., nn.Module] = ChannelAttention,
            eta: float = 1.,
            downsample: Optional[nn.Module] = None,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = TokenMixing(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim, **dd))
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(dim, **dd)
        self.gamma2 = nn.Parameter(eta * torch.ones(dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        x = x + self.drop_path(self.attn(self.norm1(x), self.gamma1))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W, self.gamma2))
        if self.downsample is not None:
            x, H, W = self.downsample(x, H, W)
        return x, H, W
