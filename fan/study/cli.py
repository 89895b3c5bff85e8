"""``fan study fashion-mnist``: train the FAN micro models and their baselines on Fashion-MNIST with one recipe and
several seeds, then measure them (clean accuracy, Fashion-MNIST-C, token spectra, ASH OOD, LP-FT) and write a report.

Every stage writes its results as it finishes them, so the command resumes where an interruption stopped it.
"""
import argparse
import time
from pathlib import Path
from typing import List

from tqdm import tqdm

from ..errors import UserError, require_extra
from ..options import (add_data_option, add_out_option, add_run_options, non_negative_int, positive_int, resolve_device,
                       writable_folder)
from ..data.fashion_mnist import load_fashion_mnist
from .training import MODELS, Recipe, StudyModel, run_name, train_run

__all__ = ['add_commands', 'TRANSFER_MODELS', 'SOURCE_CLASSES']

TRANSFER_MODELS = ('fan_vit', 'vit', 'convnet')  # LP-FT: trained on half the classes, transferred to the other half
SOURCE_CLASSES = (0, 1, 2, 3, 4)
REFERENCE = 'convnet'  # Fashion-MNIST-C errors are normalised by this model's


def _selected_models(keys: List[str], weights_only: bool) -> List[StudyModel]:
    known = {spec.key: spec for spec in MODELS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UserError(f'unknown study model(s) {unknown}: choose from {sorted(known)}')
    if weights_only:
        fan_models = [known[k] for k in keys if known[k].is_fan]
        if not fan_models:
            raise UserError(f'--weights-only trains FAN models only, and --models names none: choose from '
                            f'{[spec.key for spec in MODELS if spec.is_fan]}')
        return fan_models
    if REFERENCE not in keys:
        raise UserError(f'--models needs {REFERENCE!r}: it normalises the Fashion-MNIST-C errors (CE)')
    return [known[k] for k in keys]


def _run_study(args: argparse.Namespace) -> int:
    specs = _selected_models(args.models, args.weights_only)
    if not args.weights_only:
        require_extra('imagecorruptions', 'robustness')  # Fashion-MNIST-C
        require_extra('sklearn', 'analysis')  # the OOD digits, the linear probes
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    data = load_fashion_mnist(args.data)
    device = resolve_device(args.device)
    out: Path = args.out
    jobs = [(spec, seed, None) for seed in args.seeds for spec in specs]
    transfer = [] if args.weights_only else [(spec, args.seeds[0], SOURCE_CLASSES) for spec in specs
                                             if spec.key in TRANSFER_MODELS]  # the LP-FT sources
    jobs += transfer
    started = time.time()
    for number, (spec, seed, classes) in enumerate(jobs, 1):
        name = run_name(spec, seed, classes)
        with tqdm(desc=f'[{number}/{len(jobs)}] {name}', unit='step', leave=False, dynamic_ncols=True) as bar:
            def progress(step: int, total: int, values) -> None:
                bar.total = total
                bar.n = step
                bar.set_postfix(values, refresh=False)
                bar.refresh()

            history = train_run(spec, seed, recipe, data, out / 'runs' / name, device, fast=args.optimize,
                                classes=classes, progress=progress)
        last = history['epochs'][-1]
        print(f'[{number}/{len(jobs)}] {name}: test top-1 {last["test_top1"]:.4f} after {last["epoch"]} epochs, '
              f'{last["train_img_s"]:.0f} img/s ({(time.time() - started) / 60:.1f} min so far)', flush=True)
    from ..bench.runner import describe_machine
    from .evaluate import evaluate_study
    from .report import write_report
    from .weights import export_best_weights

    command = _command(args)
    if args.weights_only:
        records = export_best_weights(out, specs, args.seeds, recipe, command, args.data)
    else:
        results = evaluate_study(out, specs, args.seeds, data, recipe, args.c_images, transfer, device, REFERENCE)
        results['weights'] = records = export_best_weights(out, specs, args.seeds, recipe, command, args.data)
        machine = describe_machine('cpu')
        for folder in [out] + ([args.report] if args.report else []):
            print(f'written: {write_report(results, folder, command, machine)}')
    for record in records:
        print(f'{record["model"]}: test top-1 {record["test_top1"]:.4f} (seed {record["seed"]}), '
              f'{out / "weights" / record["file"]}')
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces these results (the settings that decide them)."""
    models = '' if args.models == [spec.key for spec in MODELS] else ' --models ' + ' '.join(args.models)
    return (f'fan study fashion-mnist --epochs {args.epochs} --seeds {" ".join(map(str, args.seeds))} '
            f'-b {args.batch_size}' + ('' if args.weights_only else f' --c-images {args.c_images}') + models
            + ('' if args.optimize else ' --no-optimize') + (' --weights-only' if args.weights_only else ''))


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'study', help='a whole study on a real dataset: train, measure, report (fashion-mnist)')
    parser.add_argument('dataset', choices=['fashion-mnist'], help='the study to run')
    add_data_option(parser, 'folder with the Fashion-MNIST IDX files (default: Debian\'s dataset-fashion-mnist '
                    'package)', required=False)
    parser.add_argument('--models', nargs='+', default=[spec.key for spec in MODELS], metavar='MODEL',
                        help=f'models to train and compare (default: all of {", ".join(s.key for s in MODELS)})')
    parser.add_argument('--seeds', nargs='+', type=non_negative_int, default=[0, 1], metavar='SEED',
                        help='seeds (default: 0 1)')
    parser.add_argument('--epochs', type=positive_int, default=Recipe.epochs, metavar='N',
                        help='epochs of every run (default: %(default)s)')
    parser.add_argument('--c-images', type=positive_int, default=500, metavar='N',
                        help='test images in Fashion-MNIST-C, per corruption and severity (default: %(default)s)')
    parser.add_argument('--no-optimize', dest='optimize', action='store_false',
                        help='train the plain models on the CPU too (default: fan.optimize there)')
    parser.add_argument('--weights-only', action='store_true',
                        help='train only the FAN models among --models and export their best seed\'s weights (no '
                        'measurements, no report): a longer run for the weights that ship')
    parser.add_argument('--report', type=writable_folder, default=None, metavar='DIR',
                        help='also write the report (markdown and plots) here, e.g. docs/fashion_mnist_study')
    add_run_options(parser, batch_size=Recipe.batch_size, workers=False, precision=False, seed=None)
    add_out_option(parser, 'study-fashion-mnist')
    parser.set_defaults(func=_run_study)
