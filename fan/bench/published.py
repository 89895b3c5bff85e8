"""Published ImageNet results: FAN (official README) and the timm models the benchmark compares against (papers).

Accuracies are top-1 in %. FAN's "IN-C" is the mean top-1 accuracy over the ImageNet-C corruptions and severities
(higher is better; it is not mCE). IN-A and IN-R are top-1 on the 200-class ImageNet-A / ImageNet-R.
Nothing here is measured by this package: these are the numbers the authors report.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ['PublishedResult', 'FAN_RESULTS', 'BASELINE_TOP1', 'fan_results', 'published_top1']

_FAN_README = 'NVlabs/FAN README (commit ee1b7df)'
_VIT_TABLE = f'{_FAN_README}, FAN-ViT table'
IN1K = 'ImageNet-1K'
IN22K_IN1K = 'ImageNet-22K, fine-tuned on ImageNet-1K'


@dataclass(frozen=True)
class PublishedResult:
    """The results published for one set of FAN weights."""
    model: str  # registered model name
    tag: Optional[str]  # pretrained tag holding these weights; None: the weights were not released
    training_data: str  # IN1K or IN22K_IN1K
    img_size: int  # evaluation resolution
    imagenet_1k: float
    imagenet_c: Optional[float]  # mean corruption accuracy
    imagenet_a: Optional[float]
    imagenet_r: Optional[float]
    source: str


FAN_RESULTS: Tuple[PublishedResult, ...] = (
    PublishedResult('fan_tiny_12_p16_224', 'nv_in1k', IN1K, 224, 79.2, 57.5, 15.6, 42.5, _VIT_TABLE),
    PublishedResult('fan_small_12_p16_224', 'nv_in1k', IN1K, 224, 82.5, 64.5, 29.1, 50.4, _VIT_TABLE),
    PublishedResult('fan_base_18_p16_224', 'nv_in1k', IN1K, 224, 83.6, 67.0, 35.4, 51.8, _VIT_TABLE),
    PublishedResult('fan_large_24_p16_224', None, IN1K, 224, 83.9, 67.7, 37.2, 53.1,
                    f'{_VIT_TABLE} (weights link empty)'),
    PublishedResult('fan_tiny_8_p4_hybrid', 'nv_in1k', IN1K, 224, 80.1, 57.4, None, None,
                    f'{_FAN_README}, FAN-Hybrid table'),
    PublishedResult('fan_small_12_p4_hybrid', 'nv_in1k', IN1K, 224, 83.5, 64.7, None, None,
                    f'{_FAN_README}, FAN-Hybrid table'),
    PublishedResult('fan_base_16_p4_hybrid', 'nv_in1k', IN1K, 224, 83.9, 66.4, None, None,
                    f'{_FAN_README}, FAN-Hybrid table'),
    PublishedResult('fan_large_16_p4_hybrid', None, IN1K, 224, 84.3, 68.3, None, None,
                    f'{_FAN_README}, FAN-Hybrid table (weights link empty)'),
    PublishedResult('fan_base_16_p4_hybrid', 'nv_in22k_ft_in1k', IN22K_IN1K, 224, 85.3, 70.5, None, None,
                    f'{_FAN_README}, ImageNet-22K table'),
    PublishedResult('fan_base_16_p4_hybrid', 'nv_in22k_ft_in1k_384', IN22K_IN1K, 384, 85.6, None, None, None,
                    f'{_FAN_README}, ImageNet-22K table'),
    PublishedResult('fan_large_16_p4_hybrid', 'nv_in22k_ft_in1k', IN22K_IN1K, 224, 86.5, 73.6, None, None,
                    f'{_FAN_README}, ImageNet-22K table'),
    PublishedResult('fan_large_16_p4_hybrid', 'nv_in22k_ft_in1k_384', IN22K_IN1K, 384, 87.1, None, None, None,
                    f'{_FAN_README}, ImageNet-22K table'),
)

# ImageNet-1K top-1 (%) at 224 x 224 of the timm models in the default comparison, as their papers report them.
BASELINE_TOP1: Dict[str, Tuple[float, str]] = {
    'deit_tiny_patch16_224': (72.2, 'DeiT, arXiv:2012.12877'),
    'deit_small_patch16_224': (79.8, 'DeiT, arXiv:2012.12877'),
    'deit_base_patch16_224': (81.8, 'DeiT, arXiv:2012.12877'),
    'xcit_tiny_12_p16_224': (77.1, 'XCiT, arXiv:2106.09681'),
    'xcit_small_12_p16_224': (82.0, 'XCiT, arXiv:2106.09681'),
    'swin_tiny_patch4_window7_224': (81.3, 'Swin Transformer, arXiv:2103.14030'),
    'swin_small_patch4_window7_224': (83.0, 'Swin Transformer, arXiv:2103.14030'),
    'swin_base_patch4_window7_224': (83.5, 'Swin Transformer, arXiv:2103.14030'),
    'convnext_tiny': (82.1, 'ConvNeXt, arXiv:2201.03545'),
    'convnext_small': (83.1, 'ConvNeXt, arXiv:2201.03545'),
    'convnext_base': (83.8, 'ConvNeXt, arXiv:2201.03545'),
}


def fan_results(model: str) -> List[PublishedResult]:
    """Every published result of the registered FAN model ``model`` (untagged name)."""
    return [r for r in FAN_RESULTS if r.model == model]


def published_top1(model_name: str) -> Optional[float]:
    """Published ImageNet-1K top-1 (%) for a benchmark row, or None when unknown.

    ``name.tag``: the result of those weights. An untagged name: the model trained on ImageNet-1K alone at 224 (so
    it compares with the baselines, which are all ImageNet-1K models), or the baseline table.
    """
    name, _, tag = model_name.partition('.')
    if name in BASELINE_TOP1 and not tag:
        return BASELINE_TOP1[name][0]
    for result in fan_results(name):
        if (result.tag == tag) if tag else (result.training_data == IN1K and result.img_size == 224):
            return result.imagenet_1k
    return None
