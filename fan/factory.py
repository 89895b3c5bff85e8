"""The one way to build a model: every command and library helper calls :func:`create_model`.

It builds any timm model (FAN models included) by name, with official weights (``pretrained``), or weights from a
local file (``checkpoint``) loaded safely through the model's checkpoint filter: an official release file, a timm
training checkpoint, a bare state dict or a ``.safetensors`` file. :func:`resolve_data_config` gives the matching
preprocessing.

Which weights a training checkpoint gives: the ``state_dict`` (the official evaluation scripts load the released
files with timm 0.5.4's ``load_checkpoint`` without ``--use-ema``, so the published accuracies are those weights);
``use_ema=True`` takes ``state_dict_ema`` instead.
"""
import argparse
import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.data import create_transform, resolve_model_data_config

from .errors import MissingPathError, UserError
from .models._checkpoint import unwrap_checkpoint
from .registry import family_of, fan_models

__all__ = ['create_model', 'resolve_data_config', 'create_image_transform', 'load_checkpoint_file',
           'check_model_name']

PathLike = Union[str, os.PathLike]


def check_model_name(name: str) -> None:
    """Raise a :class:`UserError` for a name timm does not know (with close matches) or an unknown weights tag."""
    arch, _, tag = name.partition('.')
    if not timm.is_model(arch):
        candidates = fan_models() + [n for n in timm.list_models() if not n.startswith('fan_')]
        close = difflib.get_close_matches(arch, candidates, n=3, cutoff=0.7)
        hint = f'; did you mean {" or ".join(close)}?' if close else ''
        raise UserError(f'unknown model {arch!r}{hint} (`fan list` shows the FAN models)')
    if tag and name not in timm.list_pretrained(f'{arch}.*'):
        tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{arch}.*')]
        raise UserError(f'{arch} has no weights tagged {tag!r}; its tags: {", ".join(tags) or "none"}')


def load_checkpoint_file(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A checkpoint file as a clean state dict (``module.`` / ``_orig_mod.`` prefixes removed), loaded safely.

    ``.safetensors`` through safetensors; anything else through ``torch.load(weights_only=True)``, with
    ``argparse.Namespace`` (the ``args`` of timm 0.x training checkpoints) as the only extra class allowed.
    Training checkpoints give their ``state_dict`` (``model``), or ``state_dict_ema`` (``model_ema``) with
    ``use_ema``. A missing, unreadable or foreign file is a :class:`UserError` that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            checkpoint = load_file(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any failure to decode the user's file: corrupt, truncated, not a checkpoint
        raise UserError(f'cannot read checkpoint {path}: {_load_failure(error)}') from None
    if not isinstance(checkpoint, dict):
        raise UserError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict')
    try:
        state_dict = unwrap_checkpoint(checkpoint, use_ema)
    except KeyError:
        raise UserError(f'checkpoint {path} has no EMA weights (no state_dict_ema); load it without EMA') from None
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f'checkpoint {path} is not a state dict (top-level keys: {sorted(checkpoint)[:10]})')
    return state_dict


def _load_failure(error: Exception) -> str:
    """One line on why ``torch.load`` / safetensors refused a file (torch's weights-only message is a page)."""
    text = str(error)
    match = re.search(r'WeightsUnpickler error:\s*(.*?)(?:\n\n|$)', text, re.S)
    if match:
        detail = ' '.join(match.group(1).split()).split('. Please use')[0]
        if 'Unsupported global' in detail:
            return f'it holds objects that are unsafe to load ({detail})'
        return f'not a PyTorch checkpoint, or a corrupt one ({detail})'
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f'not a readable checkpoint, truncated or corrupt ({type(error).__name__}: {lines[0] if lines else ""})'


def _head_size(state_dict: Dict[str, torch.Tensor], classifier: Optional[str]) -> Optional[int]:
    """Classes of a state dict's classifier (``classifier`` as the model names it, or a timm 0.x ``head``)."""
    if not isinstance(classifier, str):
        return None
    for key in (f'{classifier}.weight', f'{classifier.rsplit(".", 1)[0]}.weight'):
        weight = state_dict.get(key)
        if weight is not None and weight.ndim == 2:
            return weight.shape[0]
    return None


def _released_file(name: str) -> Path:
    """The weights file of a FAN pretrained tag: the one that ships in the package, or the official release file
    (downloaded once, into timm's cache)."""
    from timm.models._hub import download_cached_file

    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.file:
        return Path(cfg.file)
    if cfg is None or not cfg.url:
        raise UserError(f'{name} has no released weights (`fan list` shows the tags that have)')
    try:
        return Path(download_cached_file(cfg.url, check_hash=False, progress=True))
    except OSError as error:
        raise UserError(f'cannot download the weights of {name} from {cfg.url}: {error}') from None


def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[PathLike] = None,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        use_ema: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        optimize: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Build a timm or FAN model, with weights, on ``device`` in ``dtype`` (train mode, as timm returns it).

    Args:
        name: Model name, optionally with a weights tag (``fan_base_16_p4_hybrid.nv_in22k_ft_in1k``).
        pretrained: Load the tag's released weights (FAN: the official release file, downloaded once).
        checkpoint: Load weights from this local file instead (see :func:`load_checkpoint_file`).
        num_classes: Classifier size. With weights whose head has another size, the head is new (fine-tuning);
            without ``num_classes``, a checkpoint's own head size is kept (a fine-tuned model loads as it is).
        img_size: Square input size: FAN models and models built for a fixed size are built for it (FAN models
            refuse a size that does not fit their stride); the data config follows it.
        use_ema: Take the EMA weights of a training checkpoint (default: its ``state_dict``, as the official
            evaluation does).
        device, dtype: Where and in which type the weights end up.
        optimize: Swap in the CPU fast modules (:func:`fan.optimize`); the default is the plain model, as
            ``timm.create_model`` returns it.
        kwargs: Passed to the model's constructor (``drop_path_rate=0.1``, ``features_only=True``, ...).
    """
    check_model_name(name)
    if pretrained and checkpoint is not None:
        raise UserError('give either pretrained weights or a checkpoint file, not both')
    cfg = timm.get_pretrained_cfg(name)
    if img_size is not None and (family_of(name) is not None or cfg is not None and cfg.fixed_input_size):
        kwargs['img_size'] = img_size  # (FAN models check it against their stride)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if pretrained and family_of(name) is not None:
        checkpoint = _released_file(name)  # FAN release files go through the same loading as local files
    elif pretrained and use_ema:
        raise UserError(f'EMA weights can be chosen for FAN release files and checkpoint files, not for {name}')

    overlay = None
    if checkpoint is not None:
        state_dict = load_checkpoint_file(checkpoint, use_ema)
        file_classes = _head_size(state_dict, cfg.classifier if cfg is not None else None)
        if file_classes is not None:
            kwargs.setdefault('num_classes', file_classes)  # no num_classes: the file's own head
        # timm's loader applies the model's checkpoint filter, and drops the file's head when its size differs
        overlay = dict(state_dict=state_dict, num_classes=file_classes or kwargs.get('num_classes', cfg.num_classes))
    loads_weights = pretrained or overlay is not None
    try:
        model = timm.create_model(name, pretrained=loads_weights, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as error:
        message = str(error).strip().replace('\n', ' ')[:600]
        if not loads_weights:  # the constructor refused its arguments
            raise UserError(f'cannot build {name}: {message}') from None
        source = f'checkpoint {checkpoint}' if checkpoint is not None else f'the pretrained weights of {name}'
        raise UserError(f'cannot load {source} into {name}: {message}') from None  # unfitting keys, no download
    for module in model.modules():  # the overlay's state dict must not live on in the model's config
        if isinstance(getattr(module, 'pretrained_cfg', None), dict):
            module.pretrained_cfg.pop('state_dict', None)
            if img_size is not None:
                channels = module.pretrained_cfg.get('input_size', (3,))[0]
                module.pretrained_cfg['input_size'] = (channels, img_size, img_size)
    model = model.to(device=device, dtype=dtype)
    if optimize:
        from .cpu import optimize as optimize_model
        optimize_model(model)
    return model


def resolve_data_config(
        model: nn.Module,
        img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        mean: Optional[tuple] = None,
        std: Optional[tuple] = None,
) -> Dict[str, Any]:
    """The model's timm data config (input size, interpolation, crop_pct, mean, std); any value given overrides. A
    model built with another ``in_chans`` than its pretrained config's gets that many channels in ``input_size``,
    and for one channel the mean of the config's mean and std."""
    overrides = dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    config = resolve_model_data_config(model, args={k: v for k, v in overrides.items() if v is not None})
    channels = getattr(model, 'in_chans', None)
    if isinstance(channels, int) and channels != config['input_size'][0]:
        config['input_size'] = (channels, *config['input_size'][1:])
        for key in ('mean', 'std'):
            if channels == 1 and len(config[key]) != 1:
                config[key] = (sum(config[key]) / len(config[key]),)
    return config


def create_image_transform(data_config: Dict[str, Any], **kwargs: Any) -> Callable:
    """timm's transform for a data config (``kwargs`` go to ``create_transform``, e.g. ``is_training``), taking PIL
    images in any mode: they are first converted to the model's, greyscale for a 1-channel model, else RGB."""
    from torchvision.transforms import Compose

    from .io import ImageMode

    return Compose([ImageMode.for_channels(data_config['input_size'][0]), create_transform(**data_config, **kwargs)])
