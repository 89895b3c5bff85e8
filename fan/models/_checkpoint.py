"""Checks shared by the checkpoint filters: unwrap training checkpoints, compare keys with the model."""
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import clean_state_dict

# the official evaluation loads the released files' state_dict (timm 0.5.4 load_checkpoint without --use-ema)
_WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')


def unwrap_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A timm training checkpoint (its ``state_dict``, as the official evaluation takes; ``fan.create_model``
    chooses EMA weights before the filter runs) or a bare state dict -> state dict, with the ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) prefixes removed."""
    key = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), dict)), None)
    return clean_state_dict(checkpoint[key] if key else checkpoint)


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
