"""The GPU benchmark: every FAN variant against timm models of similar cost, bf16 autocast, eager and compiled.

Four stages, each a `fan bench` run (one fresh child process per model and mode, results saved after each model):
eager inference (batch 256), eager training step (batch 128), then the same with ``torch.compile``. Peers: DeiT,
XCiT, Swin and ConvNeXt of the tiny / small / base sizes, and ViT-B/16 (users of the official code report
FAN-B-Hybrid 4x slower than ViT-B on GPU, NVlabs/FAN #29; the target here is at most 1.5x).

``--budget`` bounds the whole run: no model starts after it, so a short lease still returns every finished stage.
``--resume`` keeps what an earlier run in ``--out`` finished. The tables (``gpu.csv``, ``gpu.md``) are rebuilt from
whatever the stages hold; ``--table-only`` rebuilds them (adding fvcore GMACs where fvcore is installed).

    benchmarks/gpu.sh                                    # on a GPU machine: writes benchmarks/results/gpu/
    benchmarks/gpu.sh --device cpu --quick --out /tmp/g  # a smoke test of the script on the CPU (eager only)
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm

import fan  # noqa: F401  (registers the FAN models)
from fan.bench.measure import BenchSettings
from fan.bench.runner import describe_machine, format_table, run_benchmark
from fan.io import write_atomic, write_csv

DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'gpu'
PEERS = (
    'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
    'xcit_tiny_12_p16_224', 'xcit_small_12_p16_224',
    'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
    'convnext_tiny', 'convnext_small', 'convnext_base',
    'vit_base_patch16_224',
)
# compiled stages run these first: the tiny model of each family, the FAN-B-Hybrid / ViT-B pair and the tiny peers
COMPILE_FIRST = (
    'fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224',
    'fan_base_16_p4_hybrid', 'vit_base_patch16_224',
    'deit_tiny_patch16_224', 'xcit_tiny_12_p16_224', 'swin_tiny_patch4_window7_224', 'convnext_tiny',
)
QUICK = ('fan_tiny_12_p16_224', 'deit_tiny_patch16_224')
PAIR = ('fan_base_16_p4_hybrid', 'vit_base_patch16_224')
STAGES = (('eager', 'infer'), ('eager', 'train'), ('compiled', 'infer'), ('compiled', 'train'))


def stage_settings(device: str, mode: str, compiled: bool, quick: bool) -> BenchSettings:
    if quick:
        return BenchSettings(device=device, batch_size=2, dtype='bf16', compile=compiled, warmup=1, repeats=1)
    return BenchSettings(device=device, batch_size=256 if mode == 'infer' else 128, dtype='bf16', compile=compiled,
                         warmup=5, repeats=10)


def run_stages(models: Sequence[str], compile_models: Sequence[str], out: Path, device: str, quick: bool,
               budget: Optional[float], timeout: float, resume: bool) -> None:
    """The four stages in order. The eager stages may use the whole budget; each compiled stage (slow: every
    model compiles first) gets an equal share of what is left when it starts."""
    deadline = time.monotonic() + budget if budget else None
    for i, (tag, mode) in enumerate(STAGES):
        compiled = tag == 'compiled'
        names = compile_models if compiled else models
        if not names:
            continue
        stage_deadline = deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f'time budget spent before the {tag} {mode} stage')
                break
            if compiled:
                stage_deadline = time.monotonic() + left / (len(STAGES) - i)
        print(f'== {tag} {mode}: {len(names)} models', flush=True)
        run_benchmark(names, stage_settings(device, mode, compiled, quick), out / f'{tag}_{mode}', modes=[mode],
                      count_flops=False, resume=resume, timeout=timeout, deadline=stage_deadline)


def _stage_rows(out: Path) -> Dict[str, Dict[str, Dict[str, Any]]]:
    stages = {}
    for tag, mode in STAGES:
        path = out / f'{tag}_{mode}' / 'bench.json'
        if path.exists():
            document = json.loads(path.read_text())
            stages[f'{tag}_{mode}'] = {row['model']: row for row in document['rows']}
            stages[f'{tag}_{mode}']['__settings__'] = document['settings']
            stages[f'{tag}_{mode}']['__machine__'] = document['machine']
    return stages


TABLE_COLUMNS = (
    ('model', 'model'), ('params_m', 'params (M)'), ('gmacs', 'GMACs'),
    ('eager_infer', 'infer img/s'), ('compiled_infer', 'infer img/s (compiled)'),
    ('eager_train', 'train img/s'), ('compiled_train', 'train img/s (compiled)'),
    ('infer_peak_gib', 'infer peak GiB'), ('train_peak_gib', 'train peak GiB'), ('error', 'error'),
)


def build_table(out: Path, count_flops: bool) -> List[Dict[str, Any]]:
    """Merge the stages into one row per model; write gpu.csv and gpu.md. Returns the rows."""
    stages = _stage_rows(out)
    if not stages:
        raise SystemExit(f'no stage results under {out}')
    names = list(dict.fromkeys(n for rows in stages.values() for n in rows if not n.startswith('__')))
    flops = None
    if count_flops:
        try:
            from fan.bench.flops import count_gmacs
            flops = count_gmacs
        except ImportError:
            pass
    rows = []
    for name in names:
        row: Dict[str, Any] = {'model': name, 'error': ''}
        for stage, by_model in stages.items():
            result = by_model.get(name)
            if result is None:
                continue
            mode = stage.split('_')[1]
            row[stage] = result.get(f'{mode}_samples_per_sec')
            row.setdefault('params_m', result.get('param_count_m'))
            if stage.startswith('eager') and result.get(f'{mode}_peak_mem_mib') is not None:
                row[f'{mode}_peak_gib'] = result[f'{mode}_peak_mem_mib'] / 1024
            if result.get('error'):
                row['error'] = '; '.join(filter(None, [row['error'], f'{stage}: {result["error"]}']))
        if flops is not None:
            try:
                import torch
                with torch.device('cpu'):
                    row['gmacs'] = flops(name, tuple(timm.get_pretrained_cfg(name).input_size))
            except Exception as e:  # a count that fails leaves the cell empty
                print(f'{name}: no GMACs ({e})')
        rows.append(row)
    write_csv(out / 'gpu.csv', rows, [c for c, _ in TABLE_COLUMNS])

    any_stage = next(iter(stages.values()))
    machine, settings = any_stage['__machine__'], any_stage['__settings__']
    columns = [c for c, _ in TABLE_COLUMNS if any(row.get(c) not in (None, '') for row in rows)]
    lines = [
        '# GPU benchmark: bf16 autocast, eager and torch.compile\n',
        f'`benchmarks/gpu.sh`, {machine["date"]}, {machine.get("gpu") or machine["cpu"]}, torch {machine["torch"]}, '
        f'timm {machine["timm"]}. Random weights, each model at its default input size; inference batch '
        f'{stages.get("eager_infer", {}).get("__settings__", settings)["batch_size"]}, training batch '
        f'{stages.get("eager_train", {}).get("__settings__", settings)["batch_size"]} (forward, cross-entropy, '
        f'backward, SGD step); {settings["warmup"]} warm-up + {settings["repeats"]} timed steps, median; peak = '
        f'{"CUDA allocator peak" if machine.get("gpu") else "growth of the peak RSS"} of the eager run. Each model and mode in a fresh process. A missing cell was not measured '
        f'(time budget) or failed (error column).\n',
        format_table(rows, columns, [h for c, h in TABLE_COLUMNS if c in columns], markdown=True),
    ]
    by_name = {row['model']: row for row in rows}
    if all(n in by_name for n in PAIR):
        fan_row, vit_row = (by_name[n] for n in PAIR)
        lines.append(f'\n{PAIR[0]} vs {PAIR[1]} (time per image, FAN / ViT; target at most 1.5):')
        for stage in ('eager_infer', 'compiled_infer', 'eager_train', 'compiled_train'):
            if fan_row.get(stage) and vit_row.get(stage):
                lines.append(f'- {stage.replace("_", " ")}: {vit_row[stage] / fan_row[stage]:.2f}x')
    write_atomic(out / 'gpu.md', '\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu')
    parser.add_argument('--quick', action='store_true', help='two models, batch 2, one step each, eager only')
    parser.add_argument('--models', nargs='+', help='only these models (default: the FAN zoo and the peers)')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help='output folder (default: %(default)s)')
    parser.add_argument('--budget', type=float, help='seconds for the whole run; no model starts after them')
    parser.add_argument('--timeout', type=float, default=300, help='seconds at most per model and mode')
    parser.add_argument('--resume', action='store_true', help='keep the models an earlier run in --out finished')
    parser.add_argument('--table-only', action='store_true', help='only rebuild gpu.csv / gpu.md (with GMACs)')
    args = parser.parse_args(argv)
    if not args.table_only:
        if args.quick:
            models, compile_models = list(QUICK), []
        else:
            fan_models = timm.list_models('fan_*', module=['fan', 'fan_swin'])
            models = fan_models + list(PEERS)
            compile_models = list(COMPILE_FIRST) + [m for m in models if m not in COMPILE_FIRST]
        if args.models:
            models = args.models
            compile_models = [] if args.quick else args.models
        args.out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(describe_machine(args.device)), flush=True)
        run_stages(models, compile_models, args.out, args.device, args.quick, args.budget, args.timeout, args.resume)
    build_table(args.out, count_flops=args.table_only)
    return 0


if __name__ == '__main__':
    sys.exit(main())
