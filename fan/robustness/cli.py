"""Sub-commands ``fan eval-c``, ``fan eval`` and ``fan make-c`` (docs/robustness.md)."""
import argparse
import os
from pathlib import Path
from typing import List, Optional

from ..errors import UserError
from ..options import (add_data_option, add_model_options, add_out_option, add_run_options, default_workers,
                       finite_float, non_negative_int, nonzero_float, positive_float)
from .driver import DATASETS, FASHION_MNIST, results_path, run_classification, run_imagenet_c
from .corrupt import make_imagenet_c
from .evaluate import PROTOCOLS, ModelSpec
from .metrics import ALL_CORRUPTIONS, SEVERITIES

__all__ = ['add_commands']


def _add_preprocessing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('preprocessing (default: the model\'s data config)')
    group.add_argument('--crop-pct', type=positive_float, help='resize to size / crop_pct, then centre-crop')
    group.add_argument('--interpolation', choices=('bilinear', 'bicubic', 'nearest'))
    group.add_argument('--mean', type=finite_float, nargs=3, help='normalisation mean')
    group.add_argument('--std', type=nonzero_float, nargs=3, help='normalisation std (nonzero)')


def _model_spec(args: argparse.Namespace, protocol: str = 'resize-crop') -> ModelSpec:
    return ModelSpec(args.model, args.pretrained, args.checkpoint, args.ema, args.img_size, args.crop_pct,
                     args.interpolation, tuple(args.mean) if args.mean else None,
                     tuple(args.std) if args.std else None, protocol, args.optimize)


def _is_main_process() -> bool:
    return int(os.environ.get('RANK', '0')) == 0


def _eval_c(args: argparse.Namespace) -> int:
    results = run_imagenet_c(_model_spec(args, args.protocol), args.data, args.out, clean=args.clean,
                             corruptions=args.corruptions, severities=args.severities, force=args.force,
                             batch_size=args.batch_size, workers=args.workers, device=args.device,
                             precision=args.precision)
    if _is_main_process():
        report = args.out / 'imagenet_c.md'
        print(report.read_text())
        heat_map = args.out / 'imagenet_c.png'
        print(f'written: {args.out / "imagenet_c.json"}, {report}' + (f', {heat_map}' if heat_map.exists() else ''))
    return 0 if results['cells'] else 1


def _eval(args: argparse.Namespace) -> int:
    results = run_classification(_model_spec(args), args.dataset, args.data, out=args.out,
                                 batch_size=args.batch_size, workers=args.workers, device=args.device,
                                 precision=args.precision)
    if _is_main_process():
        print(f'{args.model} on {args.dataset} ({results["images"]} images, {results["classes"]} classes, '
              f'{results["skipped_images"]} unreadable skipped): top-1 {results["top1"]:.2f} %, '
              f'top-5 {results["top5"]:.2f} %; written: {results_path(args.out, args.dataset)}')
    return 0


def _make_c(args: argparse.Namespace) -> int:
    manifest = make_imagenet_c(args.data, args.out, args.corruptions, args.severities, seed=args.seed,
                               size=args.size, workers=args.workers, force=args.force)
    print(f'{manifest["images"]} images: {manifest["files_written"]} files written, {manifest["files_kept"]} '
          f'already there, {len(manifest["failed"])} images failed')
    for message in manifest['failed']:
        print(f'  failed: {message}')
    for corruption, reason in manifest['not_applicable'].items():
        print(f'  not made: {reason}')
    if manifest['failed'] and len(manifest['failed']) == manifest['images']:
        raise UserError(f'no image in {args.data} could be read or corrupted ({args.out / "make_c.json"} lists '
                        f'each failure)')
    return 0


def _add_cell_options(parser: argparse.ArgumentParser, corruptions_default: Optional[List[str]],
                      corruptions_help: str) -> None:
    parser.add_argument('--corruptions', nargs='+', choices=ALL_CORRUPTIONS, default=corruptions_default,
                        metavar='NAME', help=f'{corruptions_help}; among: {", ".join(ALL_CORRUPTIONS)}')
    parser.add_argument('--severities', nargs='+', type=int, choices=SEVERITIES, default=list(SEVERITIES),
                        metavar='S', help='default: 1 2 3 4 5')
    parser.add_argument('--force', action='store_true', help='start over instead of resuming')


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'eval-c', help='ImageNet-C: error per cell, CE, mCE, relative mCE, mean accuracy, retention',
        description='Evaluate any timm model on DATA/<corruption>/<severity>/<wnid>/<image>; writes '
                    'OUT/imagenet_c.json (after every finished cell), imagenet_c.md and imagenet_c.png. Re-running '
                    'resumes. Works under torchrun.')
    add_model_options(parser, num_classes=False)
    add_data_option(parser, 'ImageNet-C root')
    parser.add_argument('--clean', type=Path, metavar='DIR',
                        help='clean images DIR/<wnid>/<image> (for relative mCE, retention)')
    parser.add_argument('--protocol', choices=list(PROTOCOLS), default='as-stored',
                        help='; '.join(f'{k}: {v}' for k, v in PROTOCOLS.items()) + ' (default: %(default)s)')
    _add_cell_options(parser, None, 'default: the 15 standard ones, plus the 4 extra ones when present')
    _add_preprocessing_options(parser)
    add_out_option(parser, 'eval-c-out')
    add_run_options(parser, seed=None)
    parser.set_defaults(func=_eval_c)

    parser = subparsers.add_parser(
        'eval', help='top-1/top-5 on ImageNet, ImageNet-A or ImageNet-R (200-class logit masks), or Fashion-MNIST',
        description='Evaluate any timm model on DATA/<wnid>/<image>, or on the Fashion-MNIST test set; writes '
                    'OUT/<dataset>.json. Works under torchrun.')
    add_model_options(parser, num_classes=False)
    add_data_option(parser, f'folder of <wnid>/ class folders (e.g. ImageNet val); for {FASHION_MNIST}, its IDX '
                    'files (default: Debian\'s dataset-fashion-mnist)', required=False)
    parser.add_argument('--dataset', choices=DATASETS, default='imagenet',
                        help='which labels compete: imagenet (all 1000), or the 200 classes of imagenet-a / '
                             f'imagenet-r; {FASHION_MNIST}: the 10,000 Fashion-MNIST test images, 10 classes '
                             '(default: %(default)s)')
    _add_preprocessing_options(parser)
    add_out_option(parser, 'eval-out')
    add_run_options(parser, seed=None)
    parser.set_defaults(func=_eval)

    parser = subparsers.add_parser(
        'make-c', help='write an ImageNet-C-layout corrupted copy of an image folder',
        description='OUT/<corruption>/<severity>/<path below DATA>.JPEG (JPEG quality 85 like ImageNet-C), '
                    'reproducible from --seed; existing files are kept unless --force.')
    add_data_option(parser, 'image folder (searched recursively)')
    add_out_option(parser, 'imagenet-c')
    parser.add_argument('--size', type=non_negative_int, default=224,
                        help='resize to size*256/224 and centre-crop size x size as ImageNet-C did; 0 keeps the '
                             'original size (default: %(default)s)')
    parser.add_argument('-j', '--workers', type=non_negative_int, default=default_workers(), metavar='N',
                        help='processes (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    _add_cell_options(parser, list(ALL_CORRUPTIONS), 'default: all 19')
    parser.set_defaults(func=_make_c)
