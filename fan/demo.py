"""``fan demo``: the main job on embedded defaults, runnable on a fresh CPU-only machine.

Each step is a function ``step(out_dir: Path) -> None`` named by its import path in ``DEMO_STEPS``; it prints
what it measured and writes its files under ``out_dir``. A step that fails is reported and the others still run.
"""
import argparse
import importlib
import time
import traceback
from pathlib import Path

from .options import add_out_option

DEMO_STEPS = (
    'fan.zoo:demo_zoo_table',
    'fan.zoo:demo_classify_photos',
    'fan.zoo:demo_fashion_mnist',
    'fan.robustness.demo:demo_imagenet_c',
    'fan.analysis.cli:demo_spectrum',
    'fan.ood:demo_ash_scores',
    'fan.augment:demo_smoothmix',
    'fan.finetune:demo_lpft',
    'fan.bench.cli:demo_bench',
)


def run_demo(out_dir: Path, steps=DEMO_STEPS) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for spec in steps:
        module_name, func_name = spec.split(':')
        print(f'\n=== {func_name} ({module_name}) ===', flush=True)
        start = time.perf_counter()
        try:
            getattr(importlib.import_module(module_name), func_name)(out_dir)
        except Exception:  # keep going: one broken step must not hide the others
            traceback.print_exc()
            failed.append(spec)
        print(f'--- {func_name}: {time.perf_counter() - start:.1f} s', flush=True)
    print(f'\nfan demo: {len(steps) - len(failed)}/{len(steps)} steps done, results in {out_dir}/')
    if failed:
        print('failed steps: ' + ', '.join(failed))
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    return run_demo(args.out)


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='run the main job on embedded defaults (CPU, bundled photos)')
    add_out_option(parser, 'fan-demo')
    parser.set_defaults(func=_run)
