"""Sub-commands ``fan eval-c``, ``fan eval`` and ``fan make-c`` (see the README section "robustness")."""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .benchmarks import DATASETS, run_classification, run_imagenet_c
from .corrupt import make_imagenet_c
from .evaluate import ModelSpec
from .metrics import ALL_CORRUPTIONS, SEVERITIES

__all__ = ['add_commands']


def _default_workers() -> int:
    """Data-loading workers per process: the CPU cores divided among the local processes."""
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    return max(1, (os.cpu_count() or 1) // local_processes)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model and preprocessing')
    group.add_argument('--model', required=True, help='any timm model name (FAN models included)')
    weights = group.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="load the model's timm pretrained weights")
    weights.add_argument('--checkpoint', type=Path, help='weights file (.pth/.pth.tar/.safetensors), loaded safely')
    group.add_argument('--img-size', type=int, help="input size (default: the model's data config)")
    group.add_argument('--crop-pct', type=float, help="resize to size/crop_pct, then centre-crop (default: model's)")
    group.add_argument('--interpolation', choices=('bilinear', 'bicubic', 'nearest'), help="default: model's")
    group.add_argument('--mean', type=float, nargs=3, help="normalisation mean (default: model's)")
    group.add_argument('--std', type=float, nargs=3, help="normalisation std (default: model's)")
    run = parser.add_argument_group('execution')
    run.add_argument('--batch-size', type=int, default=64, help='per process (default: %(default)s)')
    run.add_argument('--workers', type=int, default=_default_workers(),
                     help='data-loading processes per process (default: %(default)s)')
    run.add_argument('--device', help='cpu, cuda, ... (default: cuda if available)')
    run.add_argument('--amp', action='store_true', help='bfloat16 autocast')


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(args.model, args.pretrained, args.checkpoint, args.img_size, args.crop_pct,
                     args.interpolation, tuple(args.mean) if args.mean else None,
                     tuple(args.std) if args.std else None)


def _fail(error: Exception) -> int:
    print(f'error: {error}', file=sys.stderr)
    return 2


def _eval_c(args: argparse.Namespace) -> int:
    try:
        results = run_imagenet_c(_model_spec(args), args.data, args.out, clean=args.clean,
                                 corruptions=args.corruptions, severities=args.severities, force=args.force,
                                 batch_size=args.batch_size, workers=args.workers, device=args.device,
                                 amp=args.amp)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    if int(os.environ.get('RANK', '0')) == 0:
        print(Path(args.out).with_suffix('.md').read_text())
        print(f'written: {args.out}, {Path(args.out).with_suffix(".md")}, {Path(args.out).with_suffix(".png")}')
    return 0 if results['cells'] else 1


def _eval(args: argparse.Namespace) -> int:
    try:
        results = run_classification(_model_spec(args), args.dataset, args.data, out=args.out,
                                     batch_size=args.batch_size, workers=args.workers, device=args.device,
                                     amp=args.amp)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'{args.model} on {args.dataset} ({results["images"]} images, {results["classes"]} classes, '
              f'{results["skipped_images"]} unreadable skipped): top-1 {results["top1"]:.2f} %, '
              f'top-5 {results["top5"]:.2f} %')
    return 0


def _make_c(args: argparse.Namespace) -> int:
    try:
        manifest = make_imagenet_c(args.src, args.dst, args.corruptions, args.severities, seed=args.seed,
                                   size=args.size, workers=args.workers, force=args.force)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    print(f'{manifest["images"]} images: {manifest["files_written"]} files written, {manifest["files_kept"]} '
          f'already there, {len(manifest["failed"])} images failed')
    for message in manifest['failed']:
        print(f'  failed: {message}')
    return 0 if len(manifest['failed']) < manifest['images'] else 1


def _add_cell_arguments(parser: argparse.ArgumentParser, corruptions_default: Optional[List[str]],
                        corruptions_help: str) -> None:
    parser.add_argument('--corruptions', nargs='+', choices=ALL_CORRUPTIONS, default=corruptions_default,
                        metavar='NAME', help=f'{corruptions_help}; among: {", ".join(ALL_CORRUPTIONS)}')
    parser.add_argument('--severities', nargs='+', type=int, choices=SEVERITIES, default=list(SEVERITIES),
                        metavar='S', help='default: 1 2 3 4 5')
    parser.add_argument('--force', action='store_true', help='start over instead of resuming')


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'eval-c', help='ImageNet-C: error per cell, CE, mCE, relative mCE, mean accuracy, retention',
        description='Evaluate any timm model on DIR/<corruption>/<severity>/<wnid>/<image>; writes OUT (JSON, '
                    'after every finished cell), OUT.md and OUT.png. Re-running resumes. Works under torchrun.')
    parser.add_argument('--data', type=Path, required=True, help='ImageNet-C root')
    parser.add_argument('--clean', type=Path, help='clean images DIR/<wnid>/<image> (for relative mCE, retention)')
    parser.add_argument('--out', type=Path, required=True, help='results JSON')
    _add_cell_arguments(parser, None, 'default: the 15 standard ones, plus the 4 extra ones when present')
    _add_model_arguments(parser)
    parser.set_defaults(func=_eval_c)

    parser = subparsers.add_parser(
        'eval', help='top-1/top-5 on ImageNet, ImageNet-A or ImageNet-R (200-class logit masks)',
        description='Evaluate any timm model on DIR/<wnid>/<image>. Works under torchrun.')
    parser.add_argument('--dataset', choices=DATASETS, required=True)
    parser.add_argument('--data', type=Path, required=True, help='folder of <wnid>/ class folders')
    parser.add_argument('--out', type=Path, help='results JSON (optional)')
    _add_model_arguments(parser)
    parser.set_defaults(func=_eval)

    parser = subparsers.add_parser(
        'make-c', help='write an ImageNet-C-layout corrupted copy of an image folder',
        description='DST/<corruption>/<severity>/<path below SRC>.JPEG (JPEG quality 85 like ImageNet-C), '
                    'reproducible from --seed; existing files are kept unless --force.')
    parser.add_argument('--src', type=Path, required=True, help='image folder (searched recursively)')
    parser.add_argument('--dst', type=Path, required=True, help='output root')
    parser.add_argument('--seed', type=int, default=0, help='default: %(default)s')
    parser.add_argument('--size', type=int, default=224,
                        help='resize to size*256/224 and centre-crop size x size as ImageNet-C did; 0 keeps the '
                             'original size (default: %(default)s)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes (default: %(default)s)')
    _add_cell_arguments(parser, list(ALL_CORRUPTIONS), 'default: all 19')
    parser.set_defaults(func=_make_c)


def main(argv: Optional[List[str]] = None) -> int:
    """Only these sub-commands (``python -m fan.robustness.cli``); ``fan`` offers them alongside the others."""
    parser = argparse.ArgumentParser(prog='fan-robustness')
    add_commands(parser.add_subparsers(dest='command', metavar='COMMAND', required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
