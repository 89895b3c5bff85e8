""" Fully Attentional Networks (FAN): FAN-ViT and FAN-Hybrid

Paper: `Understanding The Robustness in Vision Transformers` - https://arxiv.org/abs/2204.12451
Official code and weights: https://github.com/NVlabs/FAN (NVIDIA Source Code License-NC; the weights are for
non-commercial use). This file is an independent implementation written from the paper and a description of the
official computation; it reproduces the official outputs and loads the released checkpoints as they are.

Structure (XCiT-like): conv patch stem (or a 2-stage ConvNeXt for the hybrids) -> Fourier positional encoding ->
FAN blocks (self-attention + efficient channel attention) -> 2 class-attention blocks -> norm -> linear head.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, LayerNorm2d, get_device_dtype, to_2tuple, trunc_normal_, _assert
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_model_deprecations
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models import convnext
from timm.models.xcit import ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier
from timm.models.xcit import conv3x3 as xcit_conv3x3
from timm.models.xcit import checkpoint_filter_fn as xcit_checkpoint_filter_fn

from ..layers import ChannelAttention, FanBlock, OverlapPatchEmbed, SeMlp, map_to_tokens, tokens_to_map
from ..data.fashion_mnist import DATA_CONFIG as FASHION_MNIST_CONFIG
from ._checkpoint import check_keys, load_release_file, release_file_loading, shipped_weights_cfg, unwrap_checkpoint

__all__ = ['Fan', 'HybridEmbed', 'LegacyLayerNorm2d']  # model_registry will add each entrypoint fn to this

IntOrSeq = Union[int, Sequence[int]]


def _unbiased_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with the *unbiased* variance (divided by C - 1), through the fused kernel.

    With var_u = var_b * C / (C - 1): (x - mean) / sqrt(var_u + eps) = s * (x - mean) / sqrt(var_b + eps * (C - 1) / C)
    for s = sqrt((C - 1) / C), so it is the standard norm with eps scaled by (C - 1) / C and the weight by s.
    """
    C = x.shape[-1]
    ratio = (C - 1) / C
    return F.layer_norm(x, [C], weight * ratio ** 0.5, bias, eps * ratio)


class LegacyLayerNorm2d(LayerNorm2d):
    """LayerNorm over the channels of an NCHW map that normalises with the *unbiased* variance (divides by C - 1).

    The released FAN-Hybrid weights were trained with timm 0.5.4, whose LayerNorm2d took this path for every
    channels-last-strided input, i.e. every ConvNeXt norm after the stem. Loading those weights into a standard
    (biased) LayerNorm2d changes the outputs, so the hybrids use this norm unless ``legacy_norm=False``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unbiased_layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class LegacyLayerNorm(LayerNorm):
    """:class:`LegacyLayerNorm2d` for channels-last tensors (..., C): the norm inside the hybrids' ConvNeXt blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unbiased_layer_norm(x, self.weight, self.bias, self.eps)


class HybridBackbone(nn.Module):
    """The ConvNeXt stem of FAN-Hybrid: a k{s} s{s} conv + LayerNorm2d, then two ConvNeXt stages (the second one at
    stride 2).

    Image (B, C, H, W) -> stage maps [(B, dims[0], H/s, W/s), (B, dims[1], H/2s, W/2s)] for the stem stride s (4 for
    the released models, 2 for the micro model on 32 px images). The stages are timm's ConvNeXt stages with Linear
    MLPs (``conv_mlp=False``); the released weights' 1x1-conv MLP weights are reshaped on load
    (``checkpoint_filter_fn``).
    """

    def __init__(
            self,
            in_chans: int = 3,
            depths: Tuple[int, int] = (3, 3),
            dims: Tuple[int, int] = (128, 256),
            stem_stride: int = 4,
            legacy_norm: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        norm_layer, norm_layer_cl = (LegacyLayerNorm2d, LegacyLayerNorm) if legacy_norm else (LayerNorm2d, LayerNorm)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=stem_stride, stride=stem_stride, **dd),
            LayerNorm2d(dims[0], **dd),
        )
        self.stages = nn.Sequential(*[
            convnext.ConvNeXtStage(
                dims[max(i - 1, 0)], dims[i], stride=1 if i == 0 else 2, depth=depths[i], ls_init_value=1e-6,
                conv_mlp=False, norm_layer=norm_layer, norm_layer_cl=norm_layer_cl, **dd)
            for i in range(len(depths))])
        self.feature_info = [
            dict(num_chs=dims[i], reduction=stem_stride * 2 ** i, module=f'patch_embed.backbone.stages.{i}')
            for i in range(len(depths))]
        self.apply(_init_convnext_weights)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _init_convnext_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=.02)
        nn.init.zeros_(m.bias)


class HybridEmbed(nn.Module):
    """ConvNeXt backbone + 2x2 stride-2 projection: image (B, C, H, W) -> tokens (B, H/p * W/p, D) and the grid, for
    the patch size p (16; 8 or 4 for 28-32 px images): a stem of stride p / 4."""

    def __init__(
            self,
            in_chans: int,
            embed_dim: int,
            depths: Tuple[int, int] = (3, 3),
            dims: Tuple[int, int] = (128, 256),
            patch_size: int = 16,
            legacy_norm: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if patch_size not in (4, 8, 16):
            raise ValueError(f'patch_size must be 4, 8 or 16 for the hybrid stem, got {patch_size}')
        self.backbone = HybridBackbone(
            in_chans, depths=depths, dims=dims, stem_stride=patch_size // 4, legacy_norm=legacy_norm, **dd)
        self.proj = nn.Conv2d(self.backbone.feature_info[-1]['num_chs'], embed_dim, kernel_size=2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(self.backbone(x)[-1])
        return map_to_tokens(x), (x.shape[-2], x.shape[-1])


def conv_stem(
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        act_layer: Type[nn.Module] = nn.GELU,
        device=None,
        dtype=None,
) -> ConvPatchEmbed:
    """FAN-ViT's stem, timm's XCiT ``ConvPatchEmbed``: log2(patch_size) stride-2 3x3 conv + BatchNorm pairs with
    activations between, the widths doubling up to ``embed_dim``; image (B, C, H, W) -> tokens (B, H/p * W/p, D)
    and the grid. timm builds patch 16 (four pairs) and 8 (three); patch 4 (two: ``embed_dim / 2``, then
    ``embed_dim``), for 28-32 px images, is the same module with a two-pair ``proj``."""
    dd = {'device': device, 'dtype': dtype}
    if patch_size not in (4, 8, 16):
        raise ValueError(f'patch_size must be 4, 8 or 16 for the conv stem, got {patch_size}')
    stem = ConvPatchEmbed(patch_size=max(patch_size, 8), in_chans=in_chans, embed_dim=embed_dim,
                          act_layer=act_layer, **dd)
    if patch_size == 4:
        stem.proj = nn.Sequential(
            xcit_conv3x3(in_chans, embed_dim // 2, 2, **dd),
            act_layer(),
            xcit_conv3x3(embed_dim // 2, embed_dim, 2, **dd),
        )
        stem.patch_size = patch_size
        stem.num_patches = (stem.img_size[0] // patch_size) * (stem.img_size[1] // patch_size)
    return stem


def _per_stage(value: IntOrSeq, num_stages: int, name: str) -> Tuple[int, ...]:
    value = (value,) * num_stages if isinstance(value, int) else tuple(value)
    if len(value) != num_stages:
        raise ValueError(f'{name} gives {len(value)} values for {num_stages} stages')
    return value


class Fan(nn.Module):
    """Fully Attentional Network (FAN-ViT and FAN-Hybrid).

    ``embed_dim``, ``depth`` and ``num_heads`` are ints, or one value per stage; a new stage starts with a stride-2
    ``OverlapPatchEmbed`` attached to the last block of the previous one (only FAN-XLarge-Hybrid has two stages).
    ``forward_features`` returns every token, class token first, after the final norm: (B, 1 + N, C).
    """

    def __init__(
            self,
            img_size: IntOrSeq = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: IntOrSeq = 768,
            depth: IntOrSeq = 12,
            num_heads: IntOrSeq = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Optional[Type[nn.Module]] = None,
            norm_layer: Optional[Type[nn.Module]] = None,
            cls_attn_layers: int = 2,
            use_pos_embed: bool = True,
            eta: float = 1.,
            tokens_norm: bool = True,
            se_mlp: bool = False,
            hybrid_depths: Optional[Tuple[int, int]] = None,
            hybrid_dims: Tuple[int, int] = (128, 256),
            legacy_norm: bool = True,
            head_init_scale: float = 1.,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: Input size the model is built for (int or (H, W)), a multiple of the stem stride unless
                ``dynamic_img_pad``; any other such size also runs (the positional encoding is computed per input).
            patch_size: Stride of the stem (conv or hybrid): 16, or 8 or 4 for 28-32 px images.
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for no head).
            global_pool: Pooling for the head: 'token' (class token), 'avg' (mean of patch tokens) or ''.
            embed_dim: Token width, or one width per stage.
            depth: Number of FAN blocks, or one number per stage.
            num_heads: Attention heads (shared by token and channel attention), or one number per stage.
            mlp_ratio: Hidden width of the MLPs relative to the token width.
            qkv_bias: Biases in the q / kv projections of every attention.
            drop_rate: Dropout before the head.
            pos_drop_rate: Dropout after the positional encoding.
            proj_drop_rate: Dropout after projections and MLPs.
            attn_drop_rate: Dropout of attention weights and channel gates.
            drop_path_rate: Stochastic depth rate, the same for every FAN block (as in the paper's training).
            act_layer: Activation of the conv stem and the class-attention MLP (GELU).
            norm_layer: Norm of the blocks, class attention and final norm (LayerNorm, eps 1e-6).
            cls_attn_layers: Number of class-attention blocks.
            use_pos_embed: Add the Fourier positional encoding to the patch tokens.
            eta: Initial value of the per-channel layer scales.
            tokens_norm: Class attention normalises all tokens, not only the class token.
            se_mlp: Use the squeeze-excite MLP of the paper's ablation instead of the channel attention.
            hybrid_depths: Depths of the two ConvNeXt stages of a FAN-Hybrid stem (None: the conv stem of FAN-ViT).
            hybrid_dims: Widths of the two ConvNeXt stages of a FAN-Hybrid stem.
            legacy_norm: Hybrid only: unbiased-variance ConvNeXt norms, as the released hybrid weights need.
            head_init_scale: Scale of the initial head weights and bias.
            dynamic_img_pad: Pad inputs whose size is not a multiple of the stem stride (bottom and right, with
                zeros, as timm's ``dynamic_img_pad``) instead of refusing them.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert global_pool in ('', 'avg', 'token'), f'global_pool must be token, avg or empty, got {global_pool!r}'
        num_stages = 1 if isinstance(depth, int) else len(depth)
        depths = _per_stage(depth, num_stages, 'depth')
        dims = _per_stage(embed_dim, num_stages, 'embed_dim')
        heads = _per_stage(num_heads, num_stages, 'num_heads')
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.dynamic_img_pad = dynamic_img_pad
        self.img_size = to_2tuple(img_size)

        if hybrid_depths is not None:
            self.patch_embed = HybridEmbed(
                in_chans, dims[0], depths=hybrid_depths, dims=hybrid_dims, patch_size=patch_size,
                legacy_norm=legacy_norm, **dd)
            self.patch_size = patch_size
            stem_info = self.patch_embed.backbone.feature_info
        else:
            self.patch_embed = conv_stem(patch_size, in_chans, dims[0], act_layer, **dd)
            self.patch_size = patch_size
            stem_info = []
        if not dynamic_img_pad and (self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size):
            raise ValueError(f'img_size {self.img_size} is not a multiple of the stem stride {self.patch_size} '
                             f'(dynamic_img_pad=True pads the input)')
        self.pos_embed = PositionalEncodingFourier(dim=dims[0], **dd) if use_pos_embed else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        blocks = []
        self.feature_info = list(stem_info)
        reduction = self.patch_size
        for stage, (stage_depth, dim, stage_heads) in enumerate(zip(depths, dims, heads)):
            if se_mlp:
                mlp_layer = SeMlp
            else:
                mlp_layer = partial(
                    ChannelAttention, num_heads=stage_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate)
            for i in range(stage_depth):
                last_of_stage = i == stage_depth - 1 and stage + 1 < num_stages
                blocks.append(FanBlock(
                    dim=dim,
                    num_heads=stage_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rate,
                    norm_layer=norm_layer,
                    mlp_layer=mlp_layer,
                    eta=eta,
                    downsample=OverlapPatchEmbed(dim, dims[stage + 1], **dd) if last_of_stage else None,
                    **dd,
                ))
                if last_of_stage:
                    reduction *= 2
                self.feature_info.append(dict(
                    num_chs=dims[stage + 1] if last_of_stage else dim,
                    reduction=reduction,
                    module=f'blocks.{len(blocks) - 1}',
                ))
        self.blocks = nn.ModuleList(blocks)
        self.num_stem_features = len(stem_info)
        # the first feature level with the final width: forward_intermediates(norm=True) normalises from there on
        self.first_final_width_feature = next(
            i for i, info in enumerate(self.feature_info) if i >= self.num_stem_features and info['num_chs'] == dims[-1])

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1], **dd))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(
                dim=dims[-1],
                num_heads=heads[-1],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                act_layer=act_layer,
                norm_layer=norm_layer,
                eta=eta,
                tokens_norm=tokens_norm,
                **dd,
            )
            for _ in range(cls_attn_layers)])
        self.norm = norm_layer(dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Release file -> weights (its ``state_dict``), for timm's ``custom_load`` (``load_release_file``)."""
        load_release_file(self, checkpoint_path, checkpoint_filter_fn)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'cls_token'} | {n for n, _ in self.named_parameters() if n.startswith('pos_embed.')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=r'^blocks\.(\d+)',
            cls_attn_blocks=[(r'^cls_attn_blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if isinstance(self.patch_embed, HybridEmbed):
            for stage in self.patch_embed.backbone.stages:
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg', 'token'), f'global_pool must be token, avg or empty, got {global_pool!r}'
            assert global_pool != 'token' or self.num_prefix_tokens, 'token pooling needs the class token'
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _fit_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) whose size is a multiple of the stem stride: padded with ``dynamic_img_pad``, else
        checked."""
        height, width = x.shape[-2], x.shape[-1]
        stride = self.patch_size
        if self.dynamic_img_pad:
            return F.pad(x, (0, (stride - width % stride) % stride, 0, (stride - height % stride) % stride))
        _assert(height % stride == 0, f'input height {height} is not a multiple of the stem stride {stride} '
                                      f'(dynamic_img_pad=True pads it)')
        _assert(width % stride == 0, f'input width {width} is not a multiple of the stem stride {stride} '
                                     f'(dynamic_img_pad=True pads it)')
        return x

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Image (B, C, H, W) -> patch tokens with positional encoding (B, N, D) and the grid (Hp, Wp)."""
        x, (Hp, Wp) = self.patch_embed(self._fit_input(x))
        return self._add_pos_embed(x, Hp, Wp), Hp, Wp

    def _add_pos_embed(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Patch tokens (B, N, D) + the Fourier positional encoding of the (H, W) grid, as contiguous tokens (the
        stems give a transposed view of a map; every block is faster on contiguous tokens)."""
        if self.pos_embed is not None:
            x = x + map_to_tokens(self.pos_embed(x.shape[0], H, W))
        return self.pos_drop(x.contiguous())

    def _run_blocks(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, H, W = checkpoint(blk, x, H, W)
            else:
                x, H, W = blk(x, H, W)
        return x, H, W

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, C) -> class token prepended and refined by class attention (B, 1 + N, C)."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.cls_attn_blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, H, W = self._embed(x)
        x, H, W = self._run_blocks(x, H, W)
        if self.cls_token is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == 'avg' else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of chosen levels: for a hybrid, the two ConvNeXt stages come first, then one per FAN block.

        Args:
            x: Images (B, C, H, W).
            indices: Take the last n levels if int, all if None, the listed levels if a sequence.
            norm: Apply the final norm to the block outputs of the final width (for FAN-XLarge-Hybrid, whose
                first stage is narrower, those of the last stage; the others are returned as they are).
            stop_early: Stop after the last level taken.
            output_fmt: 'NCHW' maps, or 'NLC' tokens (FAN blocks only; ConvNeXt stages are always maps).
            intermediates_only: Return only the intermediates.
        Returns:
            The intermediates, or (forward_features output, intermediates).
        """
        assert output_fmt in ('NCHW', 'NLC'), 'output_fmt must be NCHW or NLC'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates: List[torch.Tensor] = []
        x = self._fit_input(x)
        num_stem = self.num_stem_features
        if isinstance(self.patch_embed, HybridEmbed):
            stage_maps = self.patch_embed.backbone(x)
            for i, stage_map in enumerate(stage_maps):
                if i in take_indices:
                    intermediates.append(stage_map)
            x = self.patch_embed.proj(stage_maps[-1])
            H, W = x.shape[-2], x.shape[-1]
            x = map_to_tokens(x)
        else:
            x, (H, W) = self.patch_embed(x)
        x = self._add_pos_embed(x, H, W)

        last_block = max_index - num_stem if stop_early and not torch.jit.is_scripting() else len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if i > last_block:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, H, W = checkpoint(blk, x, H, W)
            else:
                x, H, W = blk(x, H, W)
            if i + num_stem in take_indices:
                y = self.norm(x) if norm and i + num_stem >= self.first_final_width_feature else x
                intermediates.append(tokens_to_map(y, H, W).contiguous() if output_fmt == 'NCHW' else y)

        if intermediates_only:
            return intermediates
        if self.cls_token is not None:
            x = self.forward_cls(x)
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally the norm and class-attention head) not needed for these levels."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.blocks = self.blocks[:max(max_index - self.num_stem_features + 1, 0)]
        if prune_norm or max_index < self.first_final_width_feature:  # the final norm no longer fits the width
            self.norm = nn.Identity()
        if prune_head:
            self.cls_attn_blocks = nn.ModuleList()
            self.cls_token = None
            self.num_prefix_tokens = 0
            self.reset_classifier(0, '')
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: Fan) -> Dict[str, torch.Tensor]:
    """Official FAN checkpoint (a training-checkpoint dict or a bare state dict) -> this model's state dict.

    Unwraps a training checkpoint (its ``state_dict``) and strips ``module.``; timm's XCiT filter renames the legacy
    ``pos_embeder.`` and splits a fused class-attention ``qkv`` into q, k, v; the hybrid ConvNeXt's 1x1-conv MLP
    weights become Linear ones. Raises a ``ValueError`` naming any missing or unexpected keys (the classifier is
    left to timm, which drops it when ``num_classes`` differs).
    """
    state_dict = xcit_checkpoint_filter_fn(dict(unwrap_checkpoint(state_dict)), model)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.backbone.stages.') and '.mlp.fc' in k and v.ndim == 4:
            v = v.flatten(1)  # the released 1x1-conv MLP weights -> Linear weights
        out[k] = v
    check_keys(out, model)
    return out


def _create_fan(variant: str, pretrained: bool = False, **kwargs) -> Fan:
    # features_only: the last 3 blocks of FAN-ViT (2 for a 2-block model); the stride 4 / 8 / 16 maps of FAN-Hybrid
    hybrid = kwargs.get('hybrid_depths') is not None
    depth = kwargs.get('depth', 12)
    num_blocks = depth if isinstance(depth, int) else sum(depth)
    out_indices = kwargs.pop('out_indices', (0, 1, -1) if hybrid else min(3, num_blocks))
    return build_model_with_cfg(
        Fan,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **release_file_loading(kwargs),
    )


_RELEASE_URL = 'https://github.com/zhoudaquan/fully_attentional_network_ckpt/releases/download/v1.0.0/'
_LICENSE = 'nvidia-source-code-license-nc'


def _cfg(file: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': _RELEASE_URL + file if file else '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.0.0', 'classifier': 'head',
        'license': _LICENSE if file else None,
        'custom_load': True,  # the release file's state_dict, not timm's EMA-first file loading (load_pretrained)
        'paper_ids': 'arXiv:2204.12451', 'paper_name': 'Understanding The Robustness in Vision Transformers',
        'origin_url': 'https://github.com/NVlabs/FAN',
        **kwargs,
    }


_hybrid_cfg = partial(_cfg, first_conv='patch_embed.backbone.stem.0')


def _micro_cfg(**kwargs) -> Dict[str, Any]:
    """The micro models: 28 x 28 greyscale images in 10 classes (Fashion-MNIST), normalised with its statistics."""
    return {**_cfg(), **FASHION_MNIST_CONFIG, 'input_size': (1, 28, 28), **kwargs}


default_cfgs = generate_default_cfgs({
    # FAN-ViT
    'fan_tiny_12_p16_224.nv_in1k': _cfg('fan_vit_tiny.pth.tar'),
    'fan_small_12_p16_224.nv_in1k': _cfg('fan_vit_small.pth.tar'),
    'fan_base_18_p16_224.nv_in1k': _cfg('fan_vit_base.pth.tar'),
    'fan_large_24_p16_224': _cfg(),
    'fan_small_12_p16_224_se_attn': _cfg(),

    # FAN-Hybrid (ConvNeXt stem)
    'fan_tiny_8_p4_hybrid.nv_in1k': _hybrid_cfg('fan_hybrid_tiny.pth.tar'),
    'fan_small_12_p4_hybrid.nv_in1k': _hybrid_cfg('fan_hybrid_small.pth.tar'),
    'fan_base_16_p4_hybrid.nv_in1k': _hybrid_cfg('fan_hybrid_base.pth.tar'),
    'fan_base_16_p4_hybrid.nv_in22k_ft_in1k': _hybrid_cfg('fan_hybrid_base_in22k_1k.pth.tar'),
    'fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384': _hybrid_cfg(
        'fan_hybrid_base_in22k_1k_384.pth.tar', input_size=(3, 384, 384)),
    'fan_base_16_p4_hybrid.nv_in22k': _hybrid_cfg('fan_hybrid_base_in22k.pth.tar', num_classes=19167),
    'fan_large_16_p4_hybrid.nv_in22k_ft_in1k': _hybrid_cfg('fan_hybrid_large_in22k_1k.pth.tar'),
    'fan_large_16_p4_hybrid.nv_in22k_ft_in1k_384': _hybrid_cfg(
        'fan_hybrid_large_in22k_1k_384.pth.tar', input_size=(3, 384, 384)),
    'fan_large_16_p4_hybrid.nv_in22k': _hybrid_cfg('fan_hybrid_large_in22k.pth.tar', num_classes=19167),
    'fan_xlarge_16_p4_hybrid': _hybrid_cfg(),

    # micro models for 28-32 px greyscale images, with the Fashion-MNIST weights this project trained (in the package)
    'fan_micro_2_p4_28.fashion_mnist': _micro_cfg(**shipped_weights_cfg('fan_micro_2_p4_28')),
    'fan_micro_3_p8_hybrid_32.fashion_mnist': _micro_cfg(
        input_size=(1, 32, 32), first_conv='patch_embed.backbone.stem.0',
        **shipped_weights_cfg('fan_micro_3_p8_hybrid_32')),
})


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=4)
    return _create_fan('fan_tiny_12_p16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8)
    return _create_fan('fan_small_12_p16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(patch_size=16, embed_dim=448, depth=18, num_heads=8)
    return _create_fan('fan_base_18_p16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(patch_size=16, embed_dim=480, depth=24, num_heads=10)
    return _create_fan('fan_large_24_p16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p16_224_se_attn(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8, se_mlp=True)
    return _create_fan('fan_small_12_p16_224_se_attn', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(embed_dim=192, depth=8, num_heads=8, hybrid_depths=(3, 3))
    return _create_fan('fan_tiny_8_p4_hybrid', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(embed_dim=384, depth=10, num_heads=8, hybrid_depths=(3, 3))
    return _create_fan('fan_small_12_p4_hybrid', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(embed_dim=448, depth=16, num_heads=8, hybrid_depths=(3, 3))
    return _create_fan('fan_base_16_p4_hybrid', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(embed_dim=480, depth=22, num_heads=10, hybrid_depths=(3, 5), head_init_scale=0.001)
    return _create_fan('fan_large_16_p4_hybrid', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs) -> Fan:
    model_args = dict(embed_dim=(528, 768), depth=(20, 3), num_heads=(11, 16), hybrid_depths=(3, 7))
    return _create_fan('fan_xlarge_16_p4_hybrid', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_micro_2_p4_28(pretrained: bool = False, **kwargs) -> Fan:
    """FAN-ViT for 28 px greyscale images (Fashion-MNIST): patch-4 conv stem (7 x 7 tokens), 2 FAN blocks of width
    128."""
    model_args = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=128, depth=2, num_heads=4)
    return _create_fan('fan_micro_2_p4_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fan_micro_3_p8_hybrid_32(pretrained: bool = False, **kwargs) -> Fan:
    """FAN-Hybrid for 28-32 px greyscale images (Fashion-MNIST, resized to 32): a ConvNeXt block at 16 x 16 (48
    channels) and one at 8 x 8 (96), then 3 FAN blocks of width 128 on 4 x 4 tokens."""
    model_args = dict(img_size=32, in_chans=1, num_classes=10, patch_size=8, embed_dim=128, depth=3, num_heads=4,
                      hybrid_depths=(1, 1), hybrid_dims=(48, 96), legacy_norm=False)
    return _create_fan('fan_micro_3_p8_hybrid_32', pretrained=pretrained, **dict(model_args, **kwargs))


register_model_deprecations(__name__, {
    'fan_Xlarge_16_p4_hybrid': 'fan_xlarge_16_p4_hybrid',  # the official spelling
})
