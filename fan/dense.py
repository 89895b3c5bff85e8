"""FAN (or any timm model) as a backbone for dense prediction with torchvision's detection and segmentation models.

:func:`fpn_backbone` turns a model name into what torchvision's detectors expect: a module whose forward maps
images (B, 3, H, W) to an ordered dict of feature maps, all with ``out_channels`` channels, coarsest last::

    from torchvision.models.detection import FasterRCNN
    backbone = fan.dense.fpn_backbone('fan_small_12_p4_hybrid', pretrained=True)
    detector = FasterRCNN(backbone, num_classes=91)

The body is the model's ``features_only`` wrapper built with :func:`fan.create_model` (official weights or any
checkpoint); torchvision's ``FeaturePyramidNetwork`` adds the top-down pathway (and, by default, a stride-2 max-pool
level, as torchvision's ResNet-FPN does). Use a multi-scale family: FAN-Hybrid (strides 4 / 8 / 16) or FAN-Swin built
with ``dynamic_img_size=True`` (strides 4 / 8 / 16 / 32, any image size); FAN-ViT's maps all have stride 16.
:class:`FpnSegmentation` is the matching minimal semantic-segmentation model (FPN + 1x1 classifier).
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .factory import create_model

__all__ = ['FpnBackbone', 'fpn_backbone', 'FpnSegmentation']


class FpnBackbone(nn.Module):
    """A timm ``features_only`` model followed by a feature pyramid: image (B, C, H, W) -> {name: (B, out_channels,
    H_i, W_i)}, finest first; ``out_channels`` is what torchvision's detection heads read."""

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels
        self.strides = body.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


def fpn_backbone(
        name: str,
        out_indices: Optional[Sequence[int]] = None,
        out_channels: int = 256,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        **kwargs: Any,
) -> FpnBackbone:
    """A detection backbone from a model name: ``fan.create_model(name, features_only=True, ...)`` + FPN.

    Args:
        name: Model name (FAN-Hybrid and FAN-Swin give multi-scale maps).
        out_indices: Feature levels to use (default: the model's, e.g. stride 4 / 8 / 16 for FAN-Hybrid).
        out_channels: Channels of every pyramid level.
        extra_blocks: Extra pyramid levels (default: one stride-2 max-pool level).
        kwargs: For :func:`fan.create_model`: ``pretrained``, ``checkpoint``, ``dynamic_img_size=True`` (FAN-Swin at
            any image size), ``drop_path_rate``, small configs for tests, ...
    """
    if out_indices is not None:
        kwargs['out_indices'] = tuple(out_indices)
    body = create_model(name, features_only=True, **kwargs)
    return FpnBackbone(body, out_channels, extra_blocks)


class FpnSegmentation(nn.Module):
    """Semantic segmentation: an :class:`FpnBackbone`, the pyramid levels upsampled to the finest one and summed,
    then a 1x1 classifier; images (B, C, H, W) -> class logits (B, num_classes, H, W)."""

    def __init__(self, backbone: FpnBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = list(self.backbone(x).values())
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(level, size=size, mode='bilinear', align_corners=False) for level in levels)
        return F.interpolate(self.classifier(fused), size=x.shape[-2:], mode='bilinear', align_corners=False)
