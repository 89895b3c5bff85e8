"""Checks shared by the checkpoint filters (unwrap training checkpoints, compare keys with the model), and the
loading of release files that every entry point shares."""
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.models import clean_state_dict

# the official evaluation loads the released files' state_dict (timm 0.5.4 load_checkpoint without --use-ema)
_WRAPPER_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')


def unwrap_checkpoint(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A timm training checkpoint (its ``state_dict``, as the official evaluation takes, or with ``use_ema`` its
    ``state_dict_ema``) or a bare state dict -> state dict, with the ``module.`` (DDP) and ``_orig_mod.``
    (torch.compile) prefixes removed. A checkpoint with EMA weights only gives those. Raises a ``KeyError`` for
    ``use_ema`` without EMA weights."""
    keys = _EMA_KEYS if use_ema else _WRAPPER_KEYS + _EMA_KEYS
    key = next((k for k in keys if isinstance(checkpoint.get(k), dict)), None)
    if key is None and use_ema:
        raise KeyError('no EMA weights (no state_dict_ema)')
    return clean_state_dict(checkpoint[key] if key else checkpoint)


def load_release_file(model: nn.Module, path: str, filter_fn: Callable) -> None:
    """Load a release file (or any checkpoint file) into ``model`` as ``timm.create_model(name, pretrained=True)``
    and its ``pretrained_cfg_overlay=dict(file=...)`` do: the FAN cfgs set timm's ``custom_load``, so timm hands the
    downloaded or given file here instead of its own file loader, which prefers ``state_dict_ema``. The file is read
    by ``fan.create_model``'s loader (``weights_only=True``, its ``state_dict``: the weights the official evaluation
    loads), then timm's ``load_pretrained`` applies the checkpoint filter and adapts the head and input channels."""
    from timm.models._builder import load_pretrained

    from ..factory import load_checkpoint_file

    cfg = dict(model.pretrained_cfg, state_dict=load_checkpoint_file(path))
    load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=model.in_chans,
                    filter_fn=filter_fn)


def release_file_loading(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A model's build kwargs with a ``pretrained_cfg_overlay`` that names a ``file`` or ``url`` set to load it
    through ``load_release_file`` (timm resets ``custom_load`` for such an overlay unless it is given explicitly, and
    its own file loader takes ``state_dict_ema`` first). An explicit ``custom_load`` in the overlay wins."""
    overlay = kwargs.get('pretrained_cfg_overlay')
    if overlay and (overlay.get('file') or overlay.get('url')):
        kwargs = dict(kwargs, pretrained_cfg_overlay={'custom_load': True, **overlay})
    return kwargs


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


PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / 'weights'  # weights trained by this project, shipped
FASHION_MNIST_TAG = 'fashion_mnist'


def _package_file(arch: str, tag: str) -> Path:
    return PACKAGE_WEIGHTS / f'{arch}.{tag}.safetensors'


def packaged_weights(arch: str, tag: str = FASHION_MNIST_TAG) -> Optional[Path]:
    """The weights file of ``arch.tag`` that ships in the package (``fan/weights/``), or None."""
    path = _package_file(arch, tag)
    return path if path.is_file() else None


def shipped_weights_cfg(arch: str, tag: str = FASHION_MNIST_TAG) -> Dict[str, Any]:
    """The pretrained-cfg fields of weights that ship in the package: the file, and the project's licence."""
    return {'file': str(_package_file(arch, tag)), 'license': 'apache-2.0'}


def packaged_weights_record(path: Path) -> Dict[str, Any]:
    """How shipped weights were trained and what they score (the ``.json`` beside the ``.safetensors``)."""
    return json.loads(path.with_suffix('.json').read_text())
