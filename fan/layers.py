""" FAN building blocks: token self-attention, efficient channel attention, depthwise-conv MLP, FAN block.

Paper: `Understanding The Robustness in Vision Transformers` - https://arxiv.org/abs/2204.12451

Parameter names follow the official FAN checkpoints (`attn.q`, `attn.kv`, `mlp.mlp_v.dwconv.conv1`, ...), so the
released weights load without renaming. The layers were written from the paper and a description of the official
computation; see the docstrings for the quirks that checkpoint parity depends on.

These modules hold the reference computation only: every sub-layer is a module called as a module, nothing depends
on the device or dtype. The CPU kernels live in :mod:`fan.cpu` and are swapped in by :func:`fan.optimize`.

Shapes: B batch, N = H * W patch tokens, C channels, h heads, d = C / h channels per head.
"""
from typing import Callable, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from timm.layers import DropPath, LayerNorm, trunc_normal_, use_fused_attn

__all__ = [
    'DepthwiseConvMixer', 'DwConvMlp', 'TokenMixing', 'ChannelAttention', 'SeMlp', 'SqueezeExcite', 'FanBlock',
    'OverlapPatchEmbed', 'tokens_to_map', 'map_to_tokens',
]


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
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim, **dd)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim, **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C)."""
        x = tokens_to_map(x, H, W)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return map_to_tokens(x)


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
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.dwconv = DepthwiseConvMixer(hidden_features, **dd)
        self.gamma = nn.Parameter(torch.ones(hidden_features, **dd))
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop = nn.Dropout(drop)
        self.apply(_init_mlp_weights)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens (B, N, C) with grid (H, W) -> (B, N, C)."""
        x = self.fc1(x)
        mixed = self.drop(self.gamma * self.dwconv(x, H, W))
        x = x + mixed if self.residual else mixed
        return self.drop(self.fc2(x))


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


class TokenMixing(nn.Module):
    """Global multi-head self-attention over the tokens (B, N, C) -> (B, N, C).

    Separate ``q`` and ``kv`` projections (the checkpoint layout), scale d^-0.5, output projection with bias.
    Uses ``F.scaled_dot_product_attention`` unless timm's fused attention is switched off (``TIMM_FUSED_ATTN=0`` or
    ``timm.layers.set_fused_attn(False)`` before the model is built), which FLOP counters need to see the matmuls.
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
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ChannelAttention(nn.Module):
    """FAN's efficient channel attention ("attentional channel processing"), tokens (B, N, C) -> (B, N, C).

    Per head and channel c, with an identity key::

        Qs = softmax over tokens of q(x)                           (B, N, h, d)
        ks = mean over the d channels of softmax over tokens of x  (B, N, h)
        A  = sigmoid(sum_n Qs[n, c] * ks[n]) * temperature[head]   (B, h, d)
        out[n, c] = A[c] * LayerNorm(DwConvMlp(x))[n, c]

    The temperature (shape (h, 1, 1), init 1) is a gain applied after the sigmoid; there is no output projection.
    ``norm_v`` uses LayerNorm's default eps 1e-5, as in the released models. Built as an ``mlp_layer`` of
    ``FanBlock`` (``in_features``, ``hidden_features`` and ``drop`` as timm's ``Mlp`` takes them).
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            drop: float = 0.,
            mlp_residual: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        dim = in_features
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1, **dd))
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.mlp_v = DwConvMlp(dim, hidden_features, drop=drop, residual=mlp_residual, **dd)
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

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens (B, N, C) with grid (H, W) -> (B, N, C)."""
        gate = self.channel_gate(x)
        v = self.norm_v(self.mlp_v(x, H, W))
        return v * gate.unsqueeze(1)


class SqueezeExcite(nn.Module):
    """Squeeze-excite on a map (B, C, H, W) with checkpoint names ``conv_reduce`` / ``conv_expand``."""

    def __init__(self, dim: int, reduced_dim: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv_reduce = nn.Conv2d(dim, reduced_dim, 1, **dd)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times its gate (B, C, 1, 1)."""
        return x * self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class SeMlp(nn.Module):
    """The SE ablation's replacement for the channel attention, tokens (B, N, C) -> (B, N, C).

    The FAN MLP (``mlp_v``, named as in ``ChannelAttention``) followed by squeeze-excite over its output: average over
    tokens -> 1x1 conv C -> C/4 -> ReLU -> 1x1 conv C/4 -> C -> sigmoid channel gate.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int,
            drop: float = 0.,
            se_ratio: float = 0.25,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.mlp_v = DwConvMlp(in_features, hidden_features, drop=drop, **dd)
        self.se = SqueezeExcite(in_features, int(in_features * se_ratio), **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens (B, N, C) with grid (H, W) -> (B, N, C)."""
        return map_to_tokens(self.se(tokens_to_map(self.mlp_v(x, H, W), H, W)))


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
    ``mlp_layer`` builds the channel mixer as timm's blocks build their MLP,
    ``mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop, device=..., dtype=...)``
    (bind other arguments with ``functools.partial``): ``ChannelAttention`` in FAN, ``SeMlp`` in the paper's
    squeeze-excite ablation; it is called as ``mlp(x, H, W)``. ``gamma1`` / ``gamma2`` are per-channel layer scales
    initialised to ``eta`` (1.0 in every released model), as in timm's XCiT.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
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
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.gamma2 = nn.Parameter(eta * torch.ones(dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))
        if self.downsample is not None:
            x, H, W = self.downsample(x, H, W)
        return x, H, W
