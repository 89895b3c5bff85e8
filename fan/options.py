"""The command-line options every ``fan`` command shares, and what they turn into.

One convention for all commands: ``--model`` with ``--pretrained`` or ``--checkpoint`` (and ``--ema``,
``--num-classes``, ``--img-size``), ``--data`` for the input images, ``--out`` for the results folder (each command
has a default), ``--device`` (default: auto), ``--precision fp32|bf16|fp16`` (``--amp`` = bf16), ``-b/--batch-size``,
``-j/--workers`` and ``--seed``.
"""
import argparse
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Union

import torch
import torch.nn as nn

from .errors import UserError
from .factory import create_model

__all__ = [
    'PRECISIONS', 'add_model_options', 'model_from_args', 'uses_fast_modules', 'add_data_option', 'add_out_option',
    'add_run_options',
    'resolve_device', 'autocast', 'seed_everything', 'default_workers',
]

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast dtype


def add_model_options(
        parser: argparse.ArgumentParser,
        default: Optional[str] = None,
        num_classes: bool = True,
        img_size: bool = True,
        optimize: bool = True,
) -> None:
    """``--model`` (required unless ``default``), ``--pretrained`` | ``--checkpoint``, ``--ema``, and optionally
    ``--num-classes``, ``--img-size`` and ``--no-optimize``."""
    group = parser.add_argument_group('model')
    group.add_argument('--model', required=default is None, default=default,
                       help='any timm model name, FAN models included, optionally NAME.TAG for other weights'
                            + (' (default: %(default)s)' if default else ''))
    weights = group.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true',
                         help='official weights of the model (downloaded once into the timm cache)')
    weights.add_argument('--checkpoint', type=Path, metavar='FILE',
                         help='weights file: official release, timm training checkpoint, state dict or .safetensors '
                              '(loaded safely, through the model\'s checkpoint filter)')
    group.add_argument('--ema', action='store_true',
                       help='take the EMA weights of a training checkpoint (default: its state_dict, as the '
                            'official evaluation does)')
    if num_classes:
        group.add_argument('--num-classes', type=int, metavar='N',
                           help="classifier size (default: the checkpoint's head, else the model's)")
    if img_size:
        group.add_argument('--img-size', type=int, metavar='PX', help="square input size (default: the model's)")
    if optimize:
        group.add_argument('--no-optimize', dest='optimize', action='store_false',
                           help='run the plain model on the CPU too (default: fan.optimize swaps in its CPU '
                                'fast modules there)')


def model_from_args(
        args: argparse.Namespace,
        device: Optional[torch.device] = None,
        optimize: Optional[bool] = None,
        **kwargs: Any,
) -> nn.Module:
    """The model the options of :func:`add_model_options` describe (train mode, on ``device``; None: the CPU), with
    the CPU fast modules (:func:`fan.optimize`) where it runs on the CPU, unless ``--no-optimize`` or ``optimize``
    says otherwise."""
    if optimize is None:
        optimize = uses_fast_modules(args, device)
    return create_model(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, use_ema=args.ema,
        num_classes=getattr(args, 'num_classes', None), img_size=getattr(args, 'img_size', None), device=device,
        optimize=optimize, **kwargs)


def uses_fast_modules(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None) -> bool:
    """Whether a command applies :func:`fan.optimize`: on the CPU, unless ``--no-optimize``."""
    return getattr(args, 'optimize', True) and torch.device(device or 'cpu').type == 'cpu'


def add_data_option(parser: argparse.ArgumentParser, help: str, required: bool = True, **kwargs: Any) -> None:
    """``--data``: where the command's input images are."""
    parser.add_argument('--data', type=Path, required=required, metavar='DIR', help=help, **kwargs)


def add_out_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out``: the results folder."""
    parser.add_argument('--out', type=Path, default=Path(default), metavar='DIR',
                        help='results folder (default: %(default)s)')


def default_workers() -> int:
    """Data-loading workers per process: the CPU cores divided among the processes on this machine."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def add_run_options(
        parser: argparse.ArgumentParser,
        batch_size: int = 64,
        workers: bool = True,
        precision: bool = True,
        seed: Optional[int] = 0,
        device: bool = True,
) -> None:
    """``-b/--batch-size``, and optionally ``--device``, ``-j/--workers``, ``--precision`` (``--amp``) and
    ``--seed`` (its default; None: no seed option)."""
    group = parser.add_argument_group('execution')
    if device:
            group.add_argument('--device', default='auto',
                           help='auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: %(default)s)')
    group.add_argument('-b', '--batch-size', type=int, default=batch_size, metavar='N',
                       help='images per batch (default: %(default)s)')
    if workers:
        group.add_argument('-j', '--workers', type=int, default=default_workers(), metavar='N',
                           help='data-loading processes (default: %(default)s)')
    if precision:
        group.add_argument('--precision', choices=list(PRECISIONS), default='fp32',
                           help='fp32, or autocast to bf16 / fp16 (default: %(default)s)')
        group.add_argument('--amp', dest='precision', action='store_const', const='bf16',
                           help='same as --precision bf16')
    if seed is not None:
        group.add_argument('--seed', type=int, default=seed, help='random seed (default: %(default)s)')


def resolve_device(name: str = 'auto') -> torch.device:
    """'auto' -> cuda if available, else cpu; a CUDA device that is not there is a :class:`UserError`."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'unknown device {name!r} (cpu, cuda, cuda:N or auto)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name} asked for, but CUDA is not available here (use --device cpu)')
    return device


def autocast(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the autocast contexts for ``precision`` on ``device`` ('fp32': no autocast)."""
    if precision not in PRECISIONS:
        raise UserError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
