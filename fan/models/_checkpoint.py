"""Checks shared by the checkpoint filters: unwrap training checkpoints, compare keys with the model."""
from typing import Any, Dict

import torch
import torch.nn as nn

_WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')


def unwrap_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A timm training checkpoint (``state_dict_ema`` preferred, as timm does) or a bare state dict -> state dict,
    with the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes removed."""
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for k, v in checkpoint.items():
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state_dict[k] = v
    return state_dict


def check_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise a ValueError that names every missing and unexpected key (the classifier is left to timm)."""
    classifier = model.pretrained_cfg.get('classifier', 'head') if hasattr(model, 'pretrained_cfg') else 'head'
    expected = {k for k in model.state_dict() if not k.startswith(classifier + '.')}
    given = {k for k in state_dict if not k.startswith(classifier + '.')}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f'checkpoint does not fit {type(model).__name__}: '
            f'{len(missing)} missing key(s) {missing[:20]}{" ..." if len(missing) > 20 else ""}; '
            f'{len(unexpected)} unexpected key(s) {unexpected[:20]}{" ..." if len(unexpected) > 20 else ""}')
