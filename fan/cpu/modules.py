"""The CPU fast modules that :func:`fan.optimize` swaps in.

Each is a subclass of the plain module it replaces and adds no state: ``fan.optimize`` changes the class of the
module in place, so it keeps its parameters, buffers, sub-modules and hooks (the same objects; state dicts,
optimizers and EMA copies see no difference). Each forward runs its kernel only where the kernel applies (plain eager
CPU tensors in float32, or bfloat16 under CPU autocast, with the sub-modules of the types the kernel computes) and
otherwise calls the plain module's forward: other devices and dtypes, ``torch.func`` transforms, tracing, compiling
and export, replaced sub-modules such as a ``SyncBatchNorm``, active dropout.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer import WindowAttention
from timm.models.xcit import ConvPatchEmbed

from ..layers import DepthwiseConvMixer, DwConvMlp, TokenMixing, map_to_tokens, tokens_to_map
from ..models.fan import HybridEmbed
from .kernels import (
    HEADWISE_MAX_TOKENS, MKLDNN_CONV, MKLDNN_LINEAR, SWAPPED_WEIGHT_GRAD_MIN_KERNEL, ConvGeluNormConv,
    DepthwiseConvTraining, GeluMlpInChunks, HeadwiseAttention, OneDnnLinear, batch_norm_scale_shift,
    bf16_inference_input, cpu_fast_path_dtype, fold_out_scale, needs_autograd, onednn_conv, onednn_inference,
    onednn_linear, remove_padding_taps,
)

__all__ = [
    'FastLinear', 'FastTokenMixing', 'FastDwConvMlp', 'FastConvStem', 'FastHybridEmbed', 'FastGeluMlp',
    'FastDepthwiseConv2d', 'FastWindowAttention',
]


class FastLinear(nn.Linear):
    """``nn.Linear`` through oneDNN's linear, which adds the bias in the product's epilogue (``F.linear`` on the CPU
    first copies the broadcast bias into the output, a pass of its own; 1.3-1.8x faster products of FAN-T's
    3136 x 192 x 768 shapes in inference, 2 cores). With autograd in float32 the forward and input-gradient products
    go through ``OneDnnLinear``; under CPU bfloat16 autocast without autograd the product runs in bfloat16. No
    weight is cached: every call reads the current weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._kernel_dtype(x)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        if needs_autograd(x, self):
            return OneDnnLinear.apply(x, self.weight, self.bias)
        return onednn_linear(x.to(dtype), self.weight, self.bias)

    def _kernel_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """float32 or bfloat16 where the oneDNN product runs for ``x``, else None (bfloat16 only without autograd).
        (``x`` is checked before the parameters: under FX tracing both are proxies.)"""
        dtype = cpu_fast_path_dtype(x) if MKLDNN_LINEAR else None
        if dtype is None or self.bias is None or self.weight.dtype != torch.float32:
            return None
        return dtype if dtype == torch.float32 or not needs_autograd(x, self) else None


class FastTokenMixing(TokenMixing):
    """Token self-attention head by head (``HeadwiseAttention``) where it measured faster than SDPA on the CPU:
    float32 training on at most ``HEADWISE_MAX_TOKENS`` tokens (it keeps the probabilities rather than recomputing
    them: 13.6-14.0 against 17.1-19.4 ms for a FAN-T layer's forward and backward, 2 cores) and bfloat16 autocast
    inference of at least as many images as heads (1.5-1.8x for 16 images of 4 heads). Elsewhere the plain forward
    (SDPA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._headwise(x):
            return super().forward(x)
        x = bf16_inference_input(x, self)  # (one cast for q and kv)
        attended = HeadwiseAttention.apply(self.q(x), self.kv(x), self.num_heads)
        return self.proj_drop(self.proj(attended))

    def _headwise(self, x: torch.Tensor) -> bool:
        dtype = cpu_fast_path_dtype(x)
        if dtype is None or not self.fused_attn or (self.training and self.attn_drop.p > 0):
            return False
        if dtype == torch.bfloat16:
            return not needs_autograd(x, self) and x.shape[0] >= self.num_heads
        return needs_autograd(x, self) and x.shape[1] <= HEADWISE_MAX_TOKENS


def _is_standard_mixer(mixer: nn.Module) -> bool:
    """True for a ``DepthwiseConvMixer`` whose parts are the plain conv -> GELU -> BatchNorm -> conv the fused kernels
    compute (not, say, a ``SyncBatchNorm`` or a pruned or quantized conv)."""
    return (type(mixer) is DepthwiseConvMixer and type(mixer.act) is nn.GELU and type(mixer.bn) is nn.BatchNorm2d
            and type(mixer.conv1) is nn.Conv2d and type(mixer.conv2) is nn.Conv2d
            and mixer.conv1.kernel_size == mixer.conv2.kernel_size and mixer.conv1.kernel_size[0] % 2 == 1
            and mixer.conv1.stride == mixer.conv2.stride == (1, 1)
            and mixer.conv1.padding[0] == mixer.conv1.kernel_size[0] // 2)


class FastDwConvMlp(DwConvMlp):
    """The FAN MLP with its depthwise mixer fused, ``gamma`` folded into conv2's weights and the residual added on
    conv2's output map:

    - CPU inference (float32, or bfloat16 under autocast, eval mode, no autograd): two oneDNN convolutions, conv1
      with the GELU in its epilogue and conv2 with the eval-mode BatchNorm folded in and the sum in its epilogue
      (``_inference``);
    - training: ``ConvGeluNormConv``, which keeps two maps per block instead of five and recomputes the rest.

    Forward hooks on ``dwconv`` and its parts do not fire on these paths; a hook on ``fc1`` sees its output, which
    is not changed afterwards (inference adds the residual sum into fc1's output only when no hook can see it).
    """

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        dtype = cpu_fast_path_dtype(x)
        path = self._fused_path(x, dtype)
        if path is None:
            return super().forward(x, H, W)
        hidden = tokens_to_map(self.fc1(x), H, W)
        conv2 = self.dwconv.conv2
        w2, b2 = fold_out_scale(conv2.weight, conv2.bias, self.gamma)
        if path == 'inference':
            mixed = self._inference(hidden.to(dtype), w2, b2)
        else:
            mixer, conv1, bn = self.dwconv, self.dwconv.conv1, self.dwconv.bn
            mixed = ConvGeluNormConv.apply(
                hidden, conv1.weight, conv1.bias, bn.weight, bn.bias, w2, b2, mixer, self.residual)
        return self.drop(self.fc2(map_to_tokens(mixed)))

    def _fused_path(self, x: torch.Tensor, dtype: Optional[torch.dtype]) -> Optional[str]:
        """'inference', 'training' or None (the plain forward) for tokens ``x`` whose kernel dtype is ``dtype``
        (``cpu_fast_path_dtype``)."""
        if dtype is None or not _is_standard_mixer(self.dwconv):
            return None
        bn = self.dwconv.bn
        if not needs_autograd(x, self):
            foldable = not bn.training and bn.running_var is not None and self.dwconv.conv1.kernel_size == (3, 3)
            return 'inference' if foldable and MKLDNN_CONV else None
        trainable = (self.training and self.drop.p == 0 and bn.training and bn.track_running_stats
                     and x.dtype == self.fc1.weight.dtype and not torch.is_autocast_enabled('cpu'))
        return 'training' if trainable else None

    def _inference(self, x: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
        """The mixer (plus x with ``residual``) on the map x (B, C, H, W) in two oneDNN convolutions, in x's dtype.

        conv2(bn(a)) = conv2'(a) for the weights scaled by the norm's factor and a bias that adds the norm's shift
        through every tap: exact inside the image; at the border the taps that fell on conv2's zero padding saw
        zeros, not the shift, and are taken back out (``remove_padding_taps``)."""
        mixer = self.dwconv
        scale, shift = batch_norm_scale_shift(mixer.bn)
        shift_taps = w2[:, 0] * shift[:, None, None]  # (C, 3, 3): each tap's share of the shift
        bias = shift_taps.sum((1, 2)) if b2 is None else b2 + shift_taps.sum((1, 2))
        a = onednn_conv(x, mixer.conv1, mixer.conv1.weight, mixer.conv1.bias, gelu=mixer.act)
        add_to = None
        if self.residual:  # conv2's output is added into x, in the channels-last layout of its output
            hooked = self.fc1._forward_hooks or nn.modules.module._global_forward_hooks
            in_place = not hooked and x.is_contiguous(memory_format=torch.channels_last)
            add_to = x if in_place else x.clone(memory_format=torch.channels_last)  # (a hook keeps what it saw)
        out = onednn_conv(a, mixer.conv2, w2 * scale[:, None, None, None], bias, add_to=add_to)
        remove_padding_taps(out, shift_taps)
        return out


class FastConvStem(ConvPatchEmbed):
    """FAN-ViT's conv stem (timm's XCiT ``ConvPatchEmbed``) with CPU inference through oneDNN: each eval-mode
    BatchNorm folded into its convolution (exact: the norm follows the conv) and the GELU in the convolution's
    epilogue, one pass over each map instead of three, on channels-last maps (oneDNN's 24 -> 48 conv ran at 48
    GMAC/s on planar maps and 89 on channels-last ones, 2 cores). CPU float32 training runs the plain stem on a
    channels-last copy of the image (the stem's forward and backward 97-107 ms instead of 133 at batch 16)."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        dtype = onednn_inference(x, self) if self._foldable() else None
        if dtype is not None:
            # the cast first, then the layout: 1.3 ms for 16 images into bfloat16, against 3.1 ms in one strided copy
            x = self._folded(x.to(dtype).contiguous(memory_format=torch.channels_last))
        else:
            if cpu_fast_path_dtype(x) == torch.float32:
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.proj(x)
        return map_to_tokens(x), (x.shape[2], x.shape[3])

    def _foldable(self) -> bool:
        """True when ``proj`` is timm's (conv, BatchNorm) pairs with plain activations between them."""
        modules = list(self.proj)
        return all(
            type(m) is nn.Sequential and len(m) == 2 and type(m[0]) is nn.Conv2d and type(m[1]) is nn.BatchNorm2d
            and m[1].running_var is not None for m in modules[::2])

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self.proj)
        convs, activations = modules[::2], modules[1::2]  # timm's conv3x3 (Conv2d, BatchNorm2d), an activation between
        for index, (conv, bn) in enumerate(convs):
            activation = activations[index] if index < len(activations) else None
            gelu = activation if type(activation) is nn.GELU else None
            scale, shift = batch_norm_scale_shift(bn)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            x = onednn_conv(x, conv, conv.weight * scale[:, None, None, None], bias, gelu=gelu)
            if activation is not None and gelu is None:
                x = activation(x)
        return x


class FastHybridEmbed(HybridEmbed):
    """FAN-Hybrid's ConvNeXt stem, which in CPU float32 training takes the image in channels-last memory: the
    ConvNeXt stages' backward passes measured faster that way (FAN-T-Hybrid training steps 1.14x, 2 cores)."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.training and cpu_fast_path_dtype(x) == torch.float32:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class FastGeluMlp(Mlp):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2) of the hybrids' ConvNeXt blocks, whose maps are the largest of any FAN
    model (4x the channels at stride 4: 103 MB per map at batch 16 and 224 px).

    - CPU inference: the GELU in fc1's oneDNN epilogue, one pass over the hidden map instead of three (1.9x on
      3 x 56 x 56 x 128 tokens in float32, 2 cores);
    - CPU float32 training: ``GeluMlpInChunks``, chunks of tokens whose hidden maps stay in cache, the GELU output
      recomputed in the backward pass (FAN-T-Hybrid training steps 1.12-1.19x, four maps of 103 MB fewer per block).

    Forward hooks on ``fc1``, ``act`` and ``fc2`` do not fire on these paths.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gelu_between_linears():
            if self._fused_inference(x):
                hidden = onednn_linear(x.to(cpu_fast_path_dtype(x)), self.fc1.weight, self.fc1.bias, gelu=self.act)
                return self.fc2(hidden)
            if self._in_chunks(x):
                return GeluMlpInChunks.apply(
                    x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act.approximate)
        return super().forward(x)

    def _gelu_between_linears(self) -> bool:
        return (type(self.act) is nn.GELU and type(self.norm) is nn.Identity
                and type(self.fc1) in (nn.Linear, FastLinear) and type(self.fc2) in (nn.Linear, FastLinear)
                and self.fc1.bias is not None and self.fc1.weight.dtype == torch.float32
                and not (self.training and (self.drop1.p > 0 or self.drop2.p > 0)))

    def _fused_inference(self, x: torch.Tensor) -> bool:
        return MKLDNN_LINEAR and cpu_fast_path_dtype(x) is not None and not needs_autograd(x, self)

    def _in_chunks(self, x: torch.Tensor) -> bool:
        return (MKLDNN_LINEAR and cpu_fast_path_dtype(x) == torch.float32 and needs_autograd(x, self)
                and x.dtype == self.fc1.weight.dtype)


class FastDepthwiseConv2d(nn.Conv2d):
    """A depthwise, stride-1 conv with an odd kernel of at least ``SWAPPED_WEIGHT_GRAD_MIN_KERNEL`` (ConvNeXt's 7x7)
    whose CPU float32 weight gradient runs as a forward depthwise conv with the roles swapped
    (``DepthwiseConvTraining``): oneDNN's own pads every channel to a 16 x 16 block (51-64 ms against 25 ms for a
    16 x 128 x 56 x 56 map, 2 cores; ``benchmarks/depthwise_weight_grad.py``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (cpu_fast_path_dtype(x) == torch.float32 and self.weight.requires_grad and torch.is_grad_enabled()
                and self.weight.dtype == torch.float32):
            return DepthwiseConvTraining.apply(x, self.weight, self.bias)
        return super().forward(x)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        """True for a plain depthwise, stride-1, 'same'-padded conv with an odd kernel of at least
        ``SWAPPED_WEIGHT_GRAD_MIN_KERNEL``."""
        if type(conv) is not nn.Conv2d:
            return False
        k = conv.kernel_size
        return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1] and k[0] % 2 == 1
                and k[0] >= SWAPPED_WEIGHT_GRAD_MIN_KERNEL and conv.stride == (1, 1) and conv.dilation == (1, 1)
                and conv.padding == (k[0] // 2, k[0] // 2) and conv.padding_mode == 'zeros')


class FastWindowAttention(WindowAttention):
    """timm's Swin window attention with CPU eval-mode paths: float32 through ``F.scaled_dot_product_attention``
    with the relative-position bias and shift mask as its additive mask (2.5-3.7x faster than the explicit matmuls
    for shifted windows, 2 cores; timm's default for window attention is the explicit matmuls), and bfloat16 autocast
    inference in explicit bfloat16 matmuls with the query scale folded into the qkv weights and the bias and mask
    added in place on the logits. Training and other devices take timm's forward."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = cpu_fast_path_dtype(x) if not self.training else None
        if dtype == torch.bfloat16 and not needs_autograd(x, self) and isinstance(self.qkv, nn.Linear):
            return self._bf16_inference(x, mask)
        if dtype == torch.float32:
            return self._sdpa(x, mask)
        return super().forward(x, mask)

    def _window_bias(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The relative-position bias plus the shift mask of each window: (nW, h, N, N), or (1, h, N, N)."""
        bias = self._get_rel_pos_bias()
        return bias if mask is None else bias + mask.unsqueeze(1)

    def _sdpa(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B_, N, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self._window_bias(mask)
        if mask is not None:  # each window's bias and mask, for every image: (B_, h, N, N)
            bias = bias.expand(B_ // mask.shape[0], -1, -1, -1, -1).reshape(B_, h, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))

    def _bf16_inference(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B_, N, _ = x.shape
        h = self.num_heads
        q_scale = torch.ones(self.qkv.out_features, device=x.device)
        q_scale[:self.qkv.out_features // 3] = self.scale
        weight, bias = fold_out_scale(self.qkv.weight, self.qkv.bias, q_scale)
        qkv = onednn_linear(x.to(torch.bfloat16), weight, bias) if MKLDNN_LINEAR else F.linear(
            x.to(torch.bfloat16), weight.bfloat16(), bias.bfloat16() if bias is not None else None)
        q, k, v = qkv.view(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        window_bias = self._window_bias(mask)
        logits = q @ k.transpose(-2, -1)  # (B_, h, N, N), bfloat16
        logits.view(-1, *window_bias.shape).add_(window_bias.to(logits.dtype))
        torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        x = (logits @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)

