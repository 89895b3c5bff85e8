"""The FAN model families: one entry per family, read by the zoo listing, the cards, the tests and the timm peer suite.

A new family is its model module (registering its models with timm) plus one :class:`Family` entry here.
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import timm

__all__ = ['Family', 'FAMILIES', 'family_of', 'fan_models', 'fan_model_modules']


@dataclass(frozen=True)
class Family:
    name: str  # as shown to users, e.g. 'FAN-Hybrid'
    module: str  # timm's module key: the last part of the module that registers the models
    patterns: Tuple[str, ...]  # the family's model names within that module (globs)
    token_outputs: bool  # forward_features returns (B, 1 + N, C) tokens, like timm's xcit_* (peer suite)
    description: str  # one line for listings and docs
    any_size_kwargs: Dict[str, Any] = field(default_factory=dict)  # constructor arguments for inputs of any size

    def models(self) -> List[str]:
        """The family's registered models (untagged names), in timm's order."""
        names = timm.list_models(module=self.module)
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]


FAMILIES: Tuple[Family, ...] = (
    Family('FAN-ViT', 'fan', ('fan_*_p16_224*', 'fan_micro_*_p4_28'), True,
           'conv stem, stride 16 (4 for the 28 px micro model); FAN blocks, class attention'),
    Family('FAN-Hybrid', 'fan', ('fan_*_hybrid', 'fan_micro_*_hybrid_32'), True,
           'ConvNeXt stem (2 stages, stride 4 and 8; 2 and 4 for the micro model), then FAN blocks at stride 16 (8)'),
    Family('FAN-Swin', 'fan_swin', ('fan_swin_*',), False,
           'Swin Transformer (patch 4, window 7; the micro model: 2 stages, window 4) with FAN channel attention in '
           'all stages but the last',
           {'dynamic_img_size': True}),
)


def family_of(name: str) -> Optional[Family]:
    """The family of a model name (tags allowed), or None for a model that is not FAN."""
    arch = name.split('.')[0]
    return next((f for f in FAMILIES if arch in f.models()), None)


def fan_models() -> List[str]:
    """Every registered FAN model, family by family."""
    return [name for family in FAMILIES for name in family.models()]


def fan_model_modules() -> List[str]:
    """timm's module keys of the FAN families."""
    return list(dict.fromkeys(f.module for f in FAMILIES))
