"""Our FAN models against the official implementation, side by side on this machine.

The official code (NVlabs/FAN, NVIDIA Source Code License-NC) is never copied into this project: this script only
runs it from the checkout and Python environment it is given (its ``models/`` folder, with timm 0.5.4; docs/benchmarks.md
says how to set one up). Every measurement is a fresh process (``rate_child.py``); the implementations alternate,
each round in another order, so all see the same background load, and the medians over rounds are compared.

    python benchmarks/vs_official.py --official-repo /tmp/official --official-python /tmp/official/venv/bin/python \\
        [fan_tiny_12_p16_224 fan_tiny_8_p4_hybrid ...] [--rounds 3] [--variants plain optimized] [--compile] [--bf16]

Our side runs in up to four variants (``--variants``), every one on glibc's default malloc unless named so:

- ``plain``: the model as ``timm.create_model`` returns it (the reference computation);
- ``optimized``: after ``fan.optimize`` (the CPU fast modules);
- ``optimized-malloc``: ``fan.optimize`` and ``fan.tune_malloc()``, as the ``fan`` command line runs;
- with ``--compile``: ``torch.compile`` of the plain model, inference only, in the first round (slow to compile).

The official processes run on glibc's default malloc, or with ``--official-malloc fan`` on the settings
``fan.tune_malloc`` makes (through ``GLIBC_TUNABLES``), the like-for-like comparison for ``optimized-malloc``.

Writes to ``--out``: ``runs.json`` (every process's result, the conditions, the machine), ``vs_official.csv``
(medians and ratios against the official code per model and variant, with the targets met or missed) and, with
``--bf16``, ``bf16.csv`` (optimized bf16-autocast inference against fp32, one process alternating fp32 and bf16
batches: ``bf16_speedup_paired``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fan.bench.runner import describe_machine, format_table  # noqa: E402
from fan.cpu import GLIBC_TUNABLES  # noqa: E402
from fan.io import write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'vs_official'
DEFAULT_MODELS = ('fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224')
VARIANTS = {'plain': [], 'optimized': ['--optimize'], 'optimized-malloc': ['--optimize', '--tune-malloc']}
# targets, ours / official: the plain models at least as fast with at most 0.9x the memory; the optimized ones at
# least what the fast paths gave inside the models before (both on glibc's default malloc, Zen 4, issue 30)
TARGETS = {
    'plain': {'infer_ratio': ('>=', 1.0), 'train_ratio': ('>=', 1.0), 'memory_ratio': ('<=', 0.9)},
}
OPTIMIZED_BEFORE = {  # (inference, training) ratios against the official code, both on glibc's default malloc
    'fan_tiny_12_p16_224': (1.13, 1.09),
    'fan_tiny_8_p4_hybrid': (1.34, 1.44),
    'fan_swin_tiny_patch4_window7_224': (1.20, 1.19),
}
BF16_TARGET = 1.6  # bf16 autocast inference / fp32 inference, ours (optimized)


def run_child(python: str, impl: str, model: str, args: argparse.Namespace, env: Dict[str, str],
              extra: Sequence[str] = ()) -> Dict[str, Any]:
    command = [python, str(HERE / 'rate_child.py'), impl, model, '--batch', str(args.batch), '--threads',
               str(args.threads), '--seconds', str(args.seconds), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if result.returncode:
        raise RuntimeError(f'{impl} {model} failed:\n{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    result = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


def _median(runs: List[Dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _targets(model: str, variant: str) -> Dict[str, tuple]:
    if variant == 'plain':
        return TARGETS['plain']
    before = OPTIMIZED_BEFORE.get(model)
    if variant == 'optimized' and before:
        return {'infer_ratio': ('>=', before[0]), 'train_ratio': ('>=', before[1])}
    return {}


def summarize(runs: List[Dict[str, Any]], models: List[str]) -> List[Dict[str, Any]]:
    """One row per model and variant of ours: medians, the ratios against the official code, targets."""
    rows = []
    for model in models:
        official = [r for r in runs if r['model'] == model and r['impl'] == 'official']
        if not official:
            continue
        for variant in [*VARIANTS, 'compiled']:
            ours = [r for r in runs if r['model'] == model and r.get('variant') == variant
                    and r['precision'] == 'fp32']
            if not ours:
                continue
            row: Dict[str, Any] = {'model': model, 'variant': variant, 'rounds': len(ours)}
            for key in ('infer_img_s', 'train_img_s', 'peak_rss_mib'):
                if all(key in r for r in ours):
                    row[f'ours_{key}'], row[f'official_{key}'] = _median(ours, key), _median(official, key)
            row['infer_ratio'] = row['ours_infer_img_s'] / row['official_infer_img_s']
            if 'ours_train_img_s' in row:
                row['train_ratio'] = row['ours_train_img_s'] / row['official_train_img_s']
                row['memory_ratio'] = row['ours_peak_rss_mib'] / row['official_peak_rss_mib']
            plain = [r for r in runs if r['model'] == model and r.get('variant') == 'plain' and r['precision'] == 'fp32']
            if plain and variant != 'plain':
                row['infer_vs_plain'] = row['ours_infer_img_s'] / _median(plain, 'infer_img_s')
            met, missed = [], []
            for key, (op, target) in _targets(model, variant).items():
                ok = key in row and (row[key] >= target if op == '>=' else row[key] <= target)
                (met if ok else missed).append(f'{key} {op} {target:g}')
            row['targets_met'], row['targets_missed'] = '; '.join(met), '; '.join(missed)
            rows.append(row)
    return rows


def summarize_bf16(runs: List[Dict[str, Any]], models: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for model in models:
        ours = [r for r in runs if r['model'] == model and r.get('variant') == 'optimized']
        row: Dict[str, Any] = {'model': model}
        for precision in ('fp32', 'bf16'):
            chosen = [r for r in ours if r['precision'] == precision and 'infer_img_s' in r]
            if chosen:
                row[f'{precision}_infer_img_s'] = _median(chosen, 'infer_img_s')
        if 'bf16_infer_img_s' in row and 'fp32_infer_img_s' in row:
            row['bf16_speedup'] = row['bf16_infer_img_s'] / row['fp32_infer_img_s']
        paired = [r for r in ours if r['precision'] == 'paired']
        if paired:
            row['bf16_speedup_paired'] = _median(paired, 'bf16_over_fp32')
            row['paired_fp32_infer_img_s'] = _median(paired, 'fp32_infer_img_s')
            row['paired_bf16_infer_img_s'] = _median(paired, 'bf16_infer_img_s')
        speedup = row.get('bf16_speedup_paired', row.get('bf16_speedup'))
        if speedup is not None:
            row['bf16_target_met'] = speedup >= BF16_TARGET
        if ours:  # the machine's own limit: how fast its bf16 matrix products are against its fp32 ones
            row['matmul_bf16_over_fp32'] = _median(ours, 'matmul_bf16_gmacs') / _median(ours, 'matmul_fp32_gmacs')
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='*', default=list(DEFAULT_MODELS))
    parser.add_argument('--official-repo', required=True, type=Path,
                        help='folder holding the official models/ package (a checkout of NVlabs/FAN)')
    parser.add_argument('--official-python', required=True, help='a Python with timm 0.5.4 for the official code')
    parser.add_argument('--python', default=sys.executable, help='the Python with fan installed (default: this one)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--seconds', type=float, default=4.0, help='timed seconds per mode (training: 1.5x)')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=['plain', 'optimized'],
                        help='our variants (default: %(default)s)')
    parser.add_argument('--compile', action='store_true',
                        help='also torch.compile of the plain model, inference, in the first round')
    parser.add_argument('--bf16', action='store_true', help='also optimized bf16-autocast inference (bf16.csv)')
    parser.add_argument('--official-malloc', choices=('default', 'fan'), default='default',
                        help="fan: the official processes get glibc's malloc as fan.tune_malloc sets it, through "
                             'GLIBC_TUNABLES (the like-for-like comparison for optimized-malloc)')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per process')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.official_repo / 'models').is_dir():
        parser.error(f'{args.official_repo} has no models/ folder (the official implementation)')
    env = {**os.environ, 'OFFICIAL_FAN_DIR': str(args.official_repo.resolve()), 'OMP_NUM_THREADS': str(args.threads)}
    env.pop('GLIBC_TUNABLES', None)
    official_env = dict(env, GLIBC_TUNABLES=GLIBC_TUNABLES) if args.official_malloc == 'fan' else env
    machine = describe_machine('cpu')
    runs: List[Dict[str, Any]] = []
    conditions = {'batch': args.batch, 'threads': args.threads, 'seconds': args.seconds, 'rounds': args.rounds,
                  'input': '224x224 random, random weights', 'variants': args.variants,
                  'precision': 'fp32 (bf16.csv: bf16 autocast; paired: fp32 and bf16 batches alternating in one '
                               'process)',
                  'train_step': 'SGD momentum 0.9, cross-entropy, random labels',
                  'ours_commit': _git_commit(), 'compiled': 'first round, inference' if args.compile else 'no',
                  'official_malloc': official_env.get('GLIBC_TUNABLES', 'glibc default'),
                  'command': ' '.join(['python', 'benchmarks/vs_official.py', *sys.argv[1:]])}

    def save() -> None:
        write_json(args.out / 'runs.json', {'conditions': conditions, 'machine': machine, 'runs': runs})

    def measure(impl: str, variant: str, model: str, round_index: int, extra: Sequence[str] = ()) -> Dict[str, Any]:
        python, impl_env = (args.python, env) if impl == 'ours' else (args.official_python, official_env)
        run = dict(run_child(python, impl, model, args, impl_env, [*VARIANTS.get(variant, []), *extra]),
                   round=round_index, variant=variant)
        runs.append(run)
        save()
        return run

    sides = [('official', 'official')] + [('ours', variant) for variant in args.variants]
    for round_index in range(args.rounds):
        for model in args.models:
            shift = round_index % len(sides)
            for impl, variant in sides[shift:] + sides[:shift]:
                run = measure(impl, variant, model, round_index)
                print(f'round {round_index + 1}: {variant:17s} {model:34s} infer {run["infer_img_s"]:6.2f} '
                      f'train {run["train_img_s"]:6.2f} img/s, peak {run["peak_rss_mib"]:.0f} MiB', flush=True)
            if args.compile and round_index == 0:
                run = measure('ours', 'compiled', model, round_index, ['--compile', '--no-train'])
                print(f'round 1: compiled (plain)     {model:34s} infer {run["infer_img_s"]:6.2f} img/s', flush=True)
            if args.bf16:
                for extra in (['--precision', 'paired'],):
                    run = measure('ours', 'optimized', model, round_index, [*extra, '--no-train'])
                    rates = (f'infer {run["infer_img_s"]:.2f} img/s' if 'infer_img_s' in run else
                             f'fp32 {run["fp32_infer_img_s"]:.2f} / bf16 {run["bf16_infer_img_s"]:.2f} img/s, '
                             f'pairs\' median {run["bf16_over_fp32"]:.2f}x')
                    print(f'round {round_index + 1}: optimized {" ".join(extra)} {model} {rates}', flush=True)
    machine['load_avg_1min_end'] = os.getloadavg()[0]
    save()
    rows = summarize(runs, args.models)
    columns = ['model', 'variant', 'rounds', 'ours_infer_img_s', 'official_infer_img_s', 'infer_ratio',
               'ours_train_img_s', 'official_train_img_s', 'train_ratio', 'ours_peak_rss_mib', 'official_peak_rss_mib',
               'memory_ratio', 'infer_vs_plain', 'targets_met', 'targets_missed']
    write_csv(args.out / 'vs_official.csv', rows, columns)
    print(format_table(rows, [c for c in columns if c not in ('targets_met',)]))
    if args.bf16:
        bf16 = summarize_bf16(runs, args.models)
        write_csv(args.out / 'bf16.csv', bf16, sorted({k for row in bf16 for k in row}, key=lambda k: k != 'model'))
        print(format_table(bf16, [k for k in bf16[0]]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
