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

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    checkpoint_filter_fn as swin_checkpoint_filter_fn,
    resolve_stage_window_sizes,
)

from ..layers import ChannelAttention
from ..data.fashion_mnist import DATA_CONFIG as FASHION_MNIST_CONFIG
from ._checkpoint import check_keys, load_release_file, release_file_loading, shipped_weights_cfg, unwrap_checkpoint

# model_registry will add each entrypoint fn to this
__all__ = ['FanSwin', 'FanSwinBlock']


class FanSwinBlock(SwinTransformerBlock):
    """timm's Swin block (B, H, W, C) -> (B, H, W, C) whose MLP is FAN's channel attention over the whole map (it
    takes the map's grid, so the forward hands it (H, W))."""

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
            dim, int(dim * mlp_ratio), num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, drop=proj_drop,
            mlp_residual=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x), H, W))
        return x.reshape(B, H, W, C)


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
            img_size: Input size, a multiple of the last stage's stride (32 for four stages; int or (H, W)).
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
        stride = 4 * 2 ** (len(depths) - 1)
        if img_size[0] % stride or img_size[1] % stride:
            raise ValueError(f'FAN-Swin with {len(depths)} stages needs an img_size that is a multiple of {stride}, '
                             f'got {img_size}')
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
        window_sizes = resolve_stage_window_sizes(window_size, len(depths))
        for i, (stage, depth, heads, use_channel_attn, rates, stage_window) in enumerate(zip(
                self.layers, depths, num_heads, channel_attn, drop_path_rates, window_sizes)):
            block_layer = FanSwinBlock if use_channel_attn else SwinTransformerBlock
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
        self.init_weights(mode='', needs_reset=False)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Checkpoint file -> weights (its ``state_dict``), for timm's ``custom_load`` (``load_release_file``)."""
        load_release_file(self, checkpoint_path, checkpoint_filter_fn)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: FanSwin) -> Dict[str, torch.Tensor]:
    """Official FAN-Swin checkpoint (timm 0.5.4 Swin layout, training-checkpoint dict or bare) -> this model."""
    state_dict = swin_checkpoint_filter_fn(unwrap_checkpoint(state_dict), model)
    check_keys(state_dict, model)
    return state_dict


def _create_fan_swin(variant: str, pretrained: bool = False, **kwargs) -> FanSwin:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (2, 2, 6, 2))))))
    return build_model_with_cfg(
        FanSwin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **release_file_loading(kwargs),
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'custom_load': True,  # a checkpoint file's state_dict, not timm's EMA-first file loading (load_pretrained)
        'paper_ids': 'arXiv:2204.12451', 'paper_name': 'Understanding The Robustness in Vision Transformers',
        'origin_url': 'https://github.com/NVlabs/FAN',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fan_swin_tiny_patch4_window7_224': _cfg(),
    'fan_swin_small_patch4_window7_224': _cfg(),
    'fan_swin_base_patch4_window7_224': _cfg(),
    'fan_swin_large_patch4_window7_224': _cfg(),
    'fan_swin_micro_patch4_window4_32.fashion_mnist': _cfg(
        **FASHION_MNIST_CONFIG, input_size=(1, 32, 32), pool_size=(4, 4),
        **shipped_weights_cfg('fan_swin_micro_patch4_window4_32')),
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


@register_model
def fan_swin_micro_patch4_window4_32(pretrained: bool = False, **kwargs) -> FanSwin:
    """FAN-Swin for 28-32 px greyscale images (Fashion-MNIST, resized to 32): two stages (8 x 8 and 4 x 4 maps, window
    4), FAN channel attention in the first."""
    model_args = dict(img_size=32, in_chans=1, num_classes=10, embed_dim=96, depths=(2, 2), num_heads=(3, 6),
                      channel_attn=(True, False), window_size=4)
    return _create_fan_swin('fan_swin_micro_patch4_window4_32', pretrained=pretrained, **dict(model_args, **kwargs))
