""" FAN-Swin: Swin Transformer whose first three stages use FAN's channel attention as their MLP

Paper: `Understanding The Robustness in Vision Transformers` - https://arxiv.org/abs/2204.12451
Official code: https://github.com/NVlabs/FAN (NVIDIA Source Code License-NC). No FAN-Swin weights were released.

Built on timm's Swin Transformer (patch 4, window 7, shifted windows, relative position bias): in stages with
channel attention each block's MLP is a ``ChannelAttention`` over the whole stage map (not per window) whose
depthwise-conv MLP has no inner residual; the last stage keeps the plain MLP. Official checkpoints use the
timm 0.5.4 Swin layout (patch merging at the end of a stage, ``head.weight``); the filter maps them.
"""
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, to_2tuple, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import swin_transformer
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    checkpoint_filter_fn as swin_checkpoint_filter_fn,
)

from ..layers import (
    ChannelAttention, Linear, bf16_inference_input, onednn_inference, run_in_batch_chunks, use_fan_linear)
from ._checkpoint import check_keys, unwrap_checkpoint

# model_registry will add each entrypoint fn to this
__all__ = ['FanSwin', 'FanSwinBlock', 'SwinBlock', 'WindowAttention']


class WindowAttention(swin_transformer.WindowAttention):
    """timm's window attention (its parameters, buffers and relative-position bias), windows (B * nW, N, C) ->
    (B * nW, N, C): per window and head softmax(q k^T / sqrt(d) + bias + shift mask) v, then the projection; through
    ``F.scaled_dot_product_attention`` with bias and mask as its additive mask when ``fused_attn`` is set, else with
    explicit matmuls. CPU bfloat16 autocast inference takes explicit bfloat16 matmuls with the query scale folded into
    the qkv weights, bias and mask added in bfloat16 in place on the logits and the softmax taken in place (timm's
    explicit path scales the queries in a pass of their own, promotes the logits to float32 for the float32 bias and
    casts the probabilities back)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Windows x (B * nW, N, C); mask (nW, N, N) of 0 / -100 for shifted windows, or None."""
        if not torch.jit.is_scripting():
            if self._bf16_inference_path(x):
                return self._bf16_inference(x, mask)
        B_, N, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self._window_bias(mask)  # (nW or 1, h, N, N)
        if self.fused_attn:
            if mask is not None:  # each window's bias and mask, for every image: (B_, h, N, N)
                bias = bias.expand(B_ // mask.shape[0], -1, -1, -1, -1).reshape(B_, h, N, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                logits = (logits.view(-1, mask.shape[0], h, N, N) + bias).view(B_, h, N, N)
            else:
                logits = logits + bias
            x = self.attn_drop(logits.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))

    def _window_bias(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The relative-position bias plus the shift mask of each window: (nW, h, N, N), or (1, h, N, N) without
        mask."""
        bias = self._get_rel_pos_bias()  # (1, h, N, N)
        return bias if mask is None else bias + mask.unsqueeze(1)

    @torch.jit.ignore
    def _bf16_inference_path(self, x: torch.Tensor) -> bool:
        return onednn_inference(x, self) == torch.bfloat16 and isinstance(self.qkv, Linear)  # (Linear: out_scale)

    @torch.jit.ignore
    def _bf16_inference(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B_, N, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(x, self._qkv_scale(x.device))
        q, k, v = qkv.view(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self._window_bias(mask)
        logits = q @ k.transpose(-2, -1)  # (B_, h, N, N), bfloat16
        logits.view(-1, *bias.shape).add_(bias.to(logits.dtype))
        torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        x = (logits @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)

    @torch.jit.ignore
    def _qkv_scale(self, device: torch.device) -> torch.Tensor:
        """The bfloat16 path's scale of qkv's output channels (3C,): d^-0.5 for q, 1 for k and v. Made once per device
        (not a buffer: no state, no dtype casts), so that qkv's packed bfloat16 weight (``fan.layers.Linear``) is
        reused."""
        scale = self.__dict__.get('_q_scale')
        if scale is None or scale.device != device:
            scale = torch.ones(self.qkv.out_features, device=device)
            scale[:self.qkv.out_features // 3] = self.scale
            self.__dict__['_q_scale'] = scale
        return scale


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block (B, H, W, C) -> (B, H, W, C) with this module's ``WindowAttention``. In CPU bfloat16 autocast
    inference the normed map enters the shift, padding and window partition already in bfloat16 (the attention's
    first product rounds it there anyway): those three copies move half the bytes."""

    def __init__(self, dim: int, num_heads: int = 4, head_dim: Optional[int] = None, qkv_bias: bool = True,
                 proj_drop: float = 0., attn_drop: float = 0., device=None, dtype=None, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         attn_drop=attn_drop, device=device, dtype=dtype, **kwargs)
        self.attn = WindowAttention(
            dim, num_heads=num_heads, head_dim=head_dim, window_size=self.attn.window_size, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self._attention_input(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self._mlp(self.norm2(x), H, W))
        return x.reshape(B, H, W, C)

    def _mlp(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The MLP on the normed tokens x (B, H * W, C) of the (H, W) map."""
        return self.mlp(x)

    def _attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """norm1(x) for the map x (B, H, W, C), in bfloat16 under CPU bfloat16 autocast inference."""
        x = self.norm1(x)
        if not torch.jit.is_scripting():
            x = bf16_inference_input(x, self.attn)
        return x


class FanSwinBlock(SwinBlock):
    """Swin block (B, H, W, C) -> (B, H, W, C) whose MLP is FAN's channel attention over the whole map."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
            **kwargs,
    ) -> None:
        super().__init__(
            dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, device=device, dtype=dtype, **kwargs)
        self.mlp = ChannelAttention(
            dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, drop=proj_drop,
            mlp_residual=False, device=device, dtype=dtype)

    def _mlp(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The channel attention on the normed tokens x (B, H * W, C), which mixes them over the (H, W) map."""
        return self.mlp(x, H, W)


class FanSwin(SwinTransformer):
    """Swin Transformer with FAN channel attention in the stages flagged by ``channel_attn``.

    By default the model runs at the image size it is built for (``img_size``, default 224, a multiple of 32), e.g.
    ``timm.create_model('fan_swin_tiny_patch4_window7_224', img_size=384)``; ``set_input_size()`` changes it.
    ``dynamic_img_size=True`` accepts any image size (multiple of 4), building the shifted-window masks per input,
    as timm's Swin does: one model for every size of a detection or segmentation set. Feature maps have strides 4,
    8, 16 and 32.

    timm's Swin builds the patch embedding, the patch merging, the final norm and the head (its stages are built
    empty); the blocks, FAN's and plain Swin ones, are added per stage here with the same options.
    """

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            channel_attn: Tuple[bool, ...] = (True, True, True, False),
            head_dim: Optional[int] = None,
            window_size: int = 7,
            always_partition: bool = False,
            strict_img_size: bool = True,
            dynamic_img_size: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: Input size, a multiple of 32 (int or (H, W)).
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for no head).
            global_pool: Pooling for the head ('avg' or '').
            embed_dim: Width of the first stage (doubled at each stage).
            depths: Blocks per stage.
            num_heads: Attention heads per stage (used by window and channel attention).
            channel_attn: Per stage, whether the MLP is FAN's channel attention.
            head_dim: Channels per attention head (default: width / heads).
            window_size: Attention window size.
            always_partition: Always partition into windows and shift, even when the map is smaller than a window.
            strict_img_size: Refuse inputs of another size than ``img_size``.
            dynamic_img_size: Accept any input size (the same as ``strict_img_size=False``).
            mlp_ratio: Hidden width of the MLPs relative to the block width.
            qkv_bias: Biases in the qkv projections.
            drop_rate: Dropout before the head.
            proj_drop_rate: Dropout after projections and MLPs.
            attn_drop_rate: Dropout of attention weights and channel gates.
            drop_path_rate: Stochastic depth rate, a linear ramp over all blocks.
            norm_layer: Norm layer.
        """
        img_size = to_2tuple(img_size)
        if img_size[0] % 32 or img_size[1] % 32:
            raise ValueError(f'FAN-Swin needs an img_size that is a multiple of 32, got {img_size}')
        if not len(depths) == len(num_heads) == len(channel_attn):
            raise ValueError('depths, num_heads and channel_attn need one value per stage')
        # timm builds patch embedding, patch merging, norm and head; the blocks are added below
        super().__init__(
            img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
            embed_dim=embed_dim, depths=(0,) * len(depths), num_heads=num_heads, head_dim=head_dim,
            window_size=window_size, always_partition=always_partition, strict_img_size=strict_img_size,
            dynamic_img_size=dynamic_img_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
            norm_layer=norm_layer, weight_init='skip', device=device, dtype=dtype)
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        for i, (stage, depth, heads, use_channel_attn, rates, stage_window) in enumerate(zip(
                self.layers, depths, num_heads, channel_attn, drop_path_rates, self._ref_window_sizes)):
            block_layer = FanSwinBlock if use_channel_attn else SwinBlock
            stage_window = to_2tuple(stage_window)
            stage.depth = depth
            stage.blocks = nn.Sequential(*[
                block_layer(
                    dim=embed_dim * 2 ** i,
                    input_resolution=stage.output_resolution,
                    num_heads=heads,
                    head_dim=head_dim,
                    window_size=stage_window,
                    shift_size=0 if j % 2 == 0 else tuple(w // 2 for w in stage_window),
                    always_partition=always_partition,
                    dynamic_mask=self.dynamic_img_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[j],
                    norm_layer=norm_layer,
                    device=device,
                    dtype=dtype,
                )
                for j in range(depth)])
            use_fan_linear(stage.blocks)
        self.init_weights(mode='', needs_reset=False)
        # window attention: F.scaled_dot_product_attention in eval mode unless fused attention is switched off,
        # timm's choice for window attention (explicit matmuls unless asked for) in training; see train()
        self.fused_window_attn = use_fused_attn()
        self.fused_window_attn_training = use_fused_attn(experimental=True)
        # values per input pixel of the largest activation, the first stage's MLP hidden map (batch chunks of CPU
        # inference)
        self.activation_per_pixel = mlp_ratio * embed_dim / 4 ** 2

    def train(self, mode: bool = True) -> 'FanSwin':
        """Sets training or eval mode. The window attention of eval mode runs through
        ``F.scaled_dot_product_attention`` with the relative-position bias and shift mask as its additive mask (timm's
        fused path; 2.5-3.7x faster than the explicit matmuls for shifted windows on 2 CPU cores, same outputs),
        unless fused attention is switched off (``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)`` or
        ``exportable=True`` when the model is built, as FLOP counters need). Training keeps timm's default for window
        attention, the explicit matmuls, whose backward pass measured faster on the CPU."""
        super().train(mode)
        self._set_fused_window_attn(self.fused_window_attn_training if mode else self.fused_window_attn)
        return self

    def _set_fused_window_attn(self, fused: bool) -> None:
        for stage in self.layers:
            for block in stage.blocks:
                block.attn.fused_attn = fused

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._features(x)
        return self._eager_features(x)

    @torch.jit.ignore
    def _eager_features(self, x: torch.Tensor) -> torch.Tensor:
        # CPU inference runs big batches in chunks of images
        return run_in_batch_chunks(self._features, x, self.activation_per_pixel, self.training)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x)))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: FanSwin) -> Dict[str, torch.Tensor]:
    """Official FAN-Swin checkpoint (timm 0.5.4 Swin layout, training-checkpoint dict or bare) -> this model."""
    state_dict = swin_checkpoint_filter_fn(unwrap_checkpoint(state_dict), model)
    check_keys(state_dict, model)
    return state_dict


def _create_fan_swin(variant: str, pretrained: bool = False, **kwargs) -> FanSwin:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        FanSwin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'paper_ids': 'arXiv:2204.12451', 'paper_name': 'Understanding The Robustness in Vision Transformers',
        'origin_url': 'https://github.com/NVlabs/FAN',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fan_swin_tiny_patch4_window7_224': _cfg(),
    'fan_swin_small_patch4_window7_224': _cfg(),
    'fan_swin_base_patch4_window7_224': _cfg(),
    'fan_swin_large_patch4_window7_224': _cfg(),
})


@register_model
def fan_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FanSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin('fan_swin_tiny_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FanSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin('fan_swin_small_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FanSwin:
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_fan_swin('fan_swin_base_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs) -> FanSwin:
    model_args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
    return _create_fan_swin('fan_swin_large_patch4_window7_224', pretrained=pretrained, **dict(model_args, **kwargs))
