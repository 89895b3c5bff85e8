"""Our FAN models against the official implementation, side by side on this machine.

The official code (NVlabs/FAN, NVIDIA Source Code License-NC) is never copied into this project: this script only
runs it from the checkout and Python environment it is given (its ``models/`` folder, with timm 0.5.4; docs/benchmarks.md
says how to set one up). Every measurement is a fresh process
(``rate_child.py``); the two implementations alternate, each round starting with the other one, so both see the same
background load, and the medians over rounds are compared.

    python benchmarks/vs_official.py --official-repo /tmp/official --official-python /tmp/official/venv/bin/python \\
        [fan_tiny_12_p16_224 fan_tiny_8_p4_hybrid ...] [--rounds 3] [--bf16] [--compile] [--official-malloc fan]

fan tunes glibc's malloc for its CPU forward passes (``fan.layers.tune_malloc``); ``--official-malloc fan`` gives
the official processes the same allocator settings, to see how much of the difference is the allocator.

Writes ``benchmarks/results/vs_official/``: ``runs.json`` (every process's result, the conditions, the machine),
``vs_official.csv`` (medians and ratios per model, with the targets met or missed) and ``bf16.csv`` (``--bf16``:
our bf16-autocast inference against our fp32, eager and with ``--compile`` compiled, beside the ratio of the
machine's bf16 and fp32 matrix-multiply rates). The bf16 speed-up is measured twice per round: as separate fresh
processes (``bf16_speedup``: the ratio of the medians over rounds) and as one process alternating fp32 and bf16
batches (``bf16_speedup_paired``: the median over rounds of each process's median pair ratio), which cancels the
load swings between processes; the target is judged on the paired one.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fan.bench.runner import describe_machine, format_table  # noqa: E402
from fan.io import write_csv, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'vs_official'
DEFAULT_MODELS = ('fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224')
# issue targets: ours / official
TARGETS = {'infer_ratio': ('>=', 1.3), 'train_ratio': ('>=', 1.2), 'memory_ratio': ('<=', 0.85)}
BF16_TARGET = 1.6  # bf16 autocast inference / fp32 inference, ours
# glibc's malloc as fan.layers.tune_malloc sets it (no heap trimming, no mmaps), for --official-malloc fan
FAN_MALLOC_TUNABLES = f'glibc.malloc.trim_threshold={2 ** 64 - 1}:glibc.malloc.mmap_max=0'


def run_child(python: str, impl: str, model: str, args: argparse.Namespace, env: Dict[str, str],
              extra: List[str] = ()) -> Dict[str, Any]:
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


def _gmacs(model: str) -> float:
    card = HERE.parent / 'models' / f'{model}.json'
    return json.loads(card.read_text())['gmacs'] if card.exists() else float('nan')


def summarize(runs: List[Dict[str, Any]], models: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for model in models:
        ours = [r for r in runs if r['model'] == model and r['impl'] == 'ours' and r['precision'] == 'fp32'
                and not r['compile']]
        official = [r for r in runs if r['model'] == model and r['impl'] == 'official']
        if not ours or not official:
            continue
        row: Dict[str, Any] = {'model': model, 'rounds': len(ours)}
        for key in ('infer_img_s', 'train_img_s', 'peak_rss_mib'):
            row[f'ours_{key}'], row[f'official_{key}'] = _median(ours, key), _median(official, key)
        row['infer_ratio'] = row['ours_infer_img_s'] / row['official_infer_img_s']
        row['train_ratio'] = row['ours_train_img_s'] / row['official_train_img_s']
        row['memory_ratio'] = row['ours_peak_rss_mib'] / row['official_peak_rss_mib']
        ceiling = _median(ours + official, 'matmul_fp32_gmacs')
        gmacs = _gmacs(model)
        row['matmul_ceiling_gmacs'] = ceiling
        row['ours_infer_share_of_ceiling'] = row['ours_infer_img_s'] * gmacs / ceiling
        row['ours_train_share_of_ceiling'] = row['ours_train_img_s'] * 3 * gmacs / ceiling  # fwd + 2x bwd
        met, missed = [], []
        for key, (op, target) in TARGETS.items():
            ok = row[key] >= target if op == '>=' else row[key] <= target
            (met if ok else missed).append(f'{key} {op} {target:g}')
        row['targets_met'], row['targets_missed'] = '; '.join(met), '; '.join(missed)
        rows.append(row)
    return rows


def summarize_bf16(runs: List[Dict[str, Any]], models: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for model in models:
        ours = [r for r in runs if r['model'] == model and r['impl'] == 'ours']
        row: Dict[str, Any] = {'model': model}
        for precision in ('fp32', 'bf16'):
            for compiled in (False, True):
                chosen = [r for r in ours if r['precision'] == precision and r['compile'] == compiled]
                if chosen:
                    row[f'{precision}{"_compiled" if compiled else ""}_infer_img_s'] = _median(chosen, 'infer_img_s')
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
        if 'bf16_compiled_infer_img_s' in row and 'fp32_infer_img_s' in row:
            row['bf16_compiled_speedup'] = row['bf16_compiled_infer_img_s'] / row['fp32_infer_img_s']
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
    parser.add_argument('--bf16', action='store_true', help='also our bf16-autocast inference (bf16.csv)')
    parser.add_argument('--compile', action='store_true',
                        help='with --bf16: also torch.compile, fp32 and bf16, in the first round (slow to compile)')
    parser.add_argument('--official-malloc', choices=('default', 'fan'), default='default',
                        help="fan: the official processes get glibc's malloc set as fan sets it for itself "
                             '(fan.layers.tune_malloc), through GLIBC_TUNABLES: the like-for-like comparison')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per process')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.official_repo / 'models').is_dir():
        parser.error(f'{args.official_repo} has no models/ folder (the official implementation)')
    env = {**__import__('os').environ, 'OFFICIAL_FAN_DIR': str(args.official_repo.resolve()), 'OMP_NUM_THREADS':
           str(args.threads)}
    official_env = dict(env, GLIBC_TUNABLES=FAN_MALLOC_TUNABLES) if args.official_malloc == 'fan' else env
    machine = describe_machine('cpu')
    runs: List[Dict[str, Any]] = []
    conditions = {'batch': args.batch, 'threads': args.threads, 'seconds': args.seconds, 'rounds': args.rounds,
                  'input': '224x224 random, random weights',
                  'precision': 'fp32 (bf16.csv: bf16 autocast; paired: fp32 and bf16 batches alternating in one '
                               'process)',
                  'train_step': 'SGD momentum 0.9, cross-entropy, random labels',
                  'ours_commit': _git_commit(), 'compiled': 'first round only' if args.compile else 'no',
                  'official_malloc': official_env.get('GLIBC_TUNABLES', 'glibc default')}

    def save() -> None:
        write_json(args.out / 'runs.json', {'conditions': conditions, 'machine': machine, 'runs': runs})

    for round_index in range(args.rounds):
        for model in args.models:
            order = ['ours', 'official'] if round_index % 2 == 0 else ['official', 'ours']
            for impl in order:
                python, impl_env = (args.python, env) if impl == 'ours' else (args.official_python, official_env)
                runs.append(dict(run_child(python, impl, model, args, impl_env), round=round_index))
                print(f'round {round_index + 1}: {impl:8s} {model:34s} infer {runs[-1]["infer_img_s"]:6.2f} '
                      f'train {runs[-1]["train_img_s"]:6.2f} img/s, peak {runs[-1]["peak_rss_mib"]:.0f} MiB',
                      flush=True)
                save()
            if args.bf16:
                compiled = (['--compile'], ['--precision', 'bf16', '--compile'])
                extras = (['--precision', 'bf16'], ['--precision', 'paired'])
                for extra in extras + (compiled if args.compile and round_index == 0 else ()):
                    runs.append(dict(run_child(args.python, 'ours', model, args, env, extra + ['--no-train']),
                                     round=round_index))
                    run = runs[-1]
                    rates = (f'infer {run["infer_img_s"]:.2f} img/s' if 'infer_img_s' in run else
                             f'fp32 {run["fp32_infer_img_s"]:.2f} / bf16 {run["bf16_infer_img_s"]:.2f} img/s, '
                             f'pairs\' median {run["bf16_over_fp32"]:.2f}x')
                    print(f'round {round_index + 1}: ours {" ".join(extra)} {model} {rates}', flush=True)
                    save()
    machine['load_avg_1min_end'] = __import__('os').getloadavg()[0]
    save()
    rows = summarize(runs, args.models)
    write_csv(args.out / 'vs_official.csv', rows, list(rows[0]) if rows else ['model'])
    columns = ['model', 'ours_infer_img_s', 'official_infer_img_s', 'infer_ratio', 'ours_train_img_s',
               'official_train_img_s', 'train_ratio', 'ours_peak_rss_mib', 'official_peak_rss_mib', 'memory_ratio',
               'ours_infer_share_of_ceiling', 'targets_missed']
    print(format_table(rows, columns))
    if args.bf16:
        bf16 = summarize_bf16(runs, args.models)
        write_csv(args.out / 'bf16.csv', bf16, sorted({k for row in bf16 for k in row}, key=lambda k: k != 'model'))
        print(format_table(bf16, [k for k in bf16[0]]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
