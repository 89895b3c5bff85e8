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
    'add_run_options', 'positive_int', 'non_negative_int', 'positive_float', 'non_negative_float', 'probability',
    'percentage', 'nonzero_float', 'finite_float', 'writable_folder',
    'resolve_device', 'autocast', 'seed_everything', 'default_workers',
]

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast dtype


def _checked(kind: type, test: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values failing ``test``; argparse turns the refusal
    into ``fan <command>: error: argument --NAME: <why>`` and exit status 2, before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a{"n" if kind is int else ""} {kind.__name__}') from None
        if value != value or not test(value):  # (NaN fails every test)
            raise argparse.ArgumentTypeError(f'must be {wanted}, got {text}')
        return value

    parse.__name__ = wanted  # (argparse names the type in some messages)
    return parse


positive_int = _checked(int, lambda v: v >= 1, 'at least 1')
non_negative_int = _checked(int, lambda v: v >= 0, '0 or more')
positive_float = _checked(float, lambda v: 0 < v < float('inf'), 'a positive number')
non_negative_float = _checked(float, lambda v: 0 <= v < float('inf'), '0 or more')
probability = _checked(float, lambda v: 0 <= v <= 1, 'between 0 and 1')
percentage = _checked(float, lambda v: 0 <= v <= 100, 'between 0 and 100')
nonzero_float = _checked(float, lambda v: v != 0 and abs(v) < float('inf'), 'a nonzero number')
finite_float = _checked(float, lambda v: abs(v) < float('inf'), 'a finite number')


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
                         help='released weights of the model: official ones (downloaded once into the timm cache), '
                              'or NAME.fashion_mnist, shipped with the package')
    weights.add_argument('--checkpoint', type=Path, metavar='FILE',
                         help='weights file: official release, timm training checkpoint, state dict or .safetensors '
                              '(loaded safely, through the model\'s checkpoint filter)')
    group.add_argument('--ema', action='store_true',
                       help='take the EMA weights of a training checkpoint (default: its state_dict, as the '
                            'official evaluation does)')
    if num_classes:
        group.add_argument('--num-classes', type=positive_int, metavar='N',
                           help="classifier size (default: the checkpoint's head, else the model's)")
    if img_size:
        group.add_argument('--img-size', type=positive_int, metavar='PX',
                           help="square input size (default: the model's)")
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


def writable_folder(text: str) -> Path:
    """``--out``: a folder that exists or can be made, and can be written to, checked as the options are parsed, before
    any work (nothing is created here): refused if it is a file, lies below a file, or is not writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f'{path} is a file, not a folder')
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f'{path} lies below {existing}, which is a file')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f'{existing} is not writable')
    return path


def add_out_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out``: the results folder (``writable_folder``)."""
    parser.add_argument('--out', type=writable_folder, default=default, metavar='DIR',
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
    group.add_argument('-b', '--batch-size', type=positive_int, default=batch_size, metavar='N',
                       help='images per batch (default: %(default)s)')
    if workers:
        group.add_argument('-j', '--workers', type=non_negative_int, default=default_workers(), metavar='N',
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
