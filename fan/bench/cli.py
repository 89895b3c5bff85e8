"""``fan bench``, ``fan bench-peers`` and ``fan cards``, and the benchmark step of ``fan demo``."""
import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Sequence

from ..errors import UserError, require_extra
from ..options import PRECISIONS, add_out_option, non_negative_int, positive_float, positive_int, resolve_device
from .measure import MODES, BenchSettings
from .runner import GMACS_NOTE, QUICK_MODELS, default_models, format_table, run_benchmark

__all__ = ['add_commands', 'settings_from_args', 'print_report', 'demo_bench']

# per-device defaults: (batch size, warm-up steps, timed steps)
_DEVICE_DEFAULTS = {'cpu': (8, 2, 5), 'cuda': (128, 10, 20)}
_TABLE = (
    ('model', 'model'), ('param_count_m', 'params (M)'), ('gmacs', 'GMACs'), ('published_top1', 'top-1 (pub.)'),
    ('infer_samples_per_sec', 'infer img/s'), ('infer_peak_mem_mib', 'infer peak MiB'),
    ('train_samples_per_sec', 'train img/s'), ('train_peak_mem_mib', 'train peak MiB'), ('error', 'error'),
)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Benchmark settings from parsed ``fan bench`` arguments; unset sizes take the device's defaults."""
    device = resolve_device(args.device)
    batch_size, warmup, repeats = _DEVICE_DEFAULTS[device.type if device.type in _DEVICE_DEFAULTS else 'cpu']
    return BenchSettings(
        device=str(device),
        batch_size=batch_size if args.batch_size is None else args.batch_size,
        img_size=args.img_size,
        dtype=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        optimize=args.optimize and device.type == 'cpu',
        grad_checkpointing=args.grad_checkpointing,
        threads=args.threads,
        warmup=warmup if args.warmup is None else args.warmup,
        repeats=repeats if args.repeats is None else args.repeats,
    )


def print_report(rows: Sequence[Dict[str, Any]], settings: BenchSettings, out_dir: Path) -> None:
    """The results table, what the numbers are, and the files written (plots included)."""
    columns = [c for c, _ in _TABLE if c != 'error' or any(r.get('error') for r in rows)]
    print(format_table(rows, columns, [h for c, h in _TABLE if c in columns]))
    print(f'\n{GMACS_NOTE}.')
    print(f'Throughput: batch {settings.batch_size} / median time of {settings.repeats} timed step(s) after '
          f'{settings.warmup} warm-up step(s); a training step is forward + cross-entropy + backward + SGD step. '
          f'Peak memory: ' + ('CUDA allocator peak' if settings.device.startswith('cuda') else
                              'growth of the peak resident set of a fresh child process per model and mode') + '.')
    try:
        require_extra('matplotlib', 'plots')
    except UserError as missing:  # the numbers are written either way; only the figures need the extra
        print(f'no plots: {missing}')
        plots = []
    else:
        from .plots import write_plots
        plots = write_plots(rows, asdict(settings), out_dir)
    print(f'Results: {out_dir / "bench.csv"}, {out_dir / "bench.json"}' + ''.join(f', {p}' for p in plots))


def _bench(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    models = args.models or (list(QUICK_MODELS) if args.quick else default_models())
    out_dir = args.out
    rows = run_benchmark(models, settings, out_dir, modes=args.modes, count_flops=not args.no_flops,
                         resume=args.resume, timeout=args.timeout)
    print_report(rows, settings, out_dir)
    return 1 if any(r.get('error') for r in rows) else 0


def _bench_peers(args: argparse.Namespace) -> int:
    from .peers import FAN_XCIT_PAIRS, compare_with_peers

    pairs = [tuple(p.split(':')) for p in args.pairs] if args.pairs else list(FAN_XCIT_PAIRS)
    if any(len(p) != 2 for p in pairs):
        raise UserError('--pairs takes FAN_MODEL:PEER_MODEL items')
    settings = BenchSettings(batch_size=args.batch_size, threads=args.threads, warmup=args.warmup,
                             repeats=args.repeats)
    out_dir = args.out
    ratios = compare_with_peers(out_dir, pairs, settings, args.ckpt_batch_size, resume=args.resume,
                                timeout=args.timeout)
    columns = ['fan_model', 'peer_model', 'infer_ratio', 'train_ratio', 'train_mem_ratio', 'ckpt_mem_cut',
               'targets_missed']
    print(format_table(ratios, columns))
    print(f'\nratios are FAN / peer (throughput: higher is better for FAN; memory: lower); ckpt_mem_cut = 1 - '
          f'training peak with / without gradient checkpointing at batch {args.ckpt_batch_size}. '
          f'Details: {out_dir / "fan_vs_peer.csv"} and the bench.* files under {out_dir}/')
    return 0


def _cards(args: argparse.Namespace) -> int:
    from .cards import card_differences, fan_model_names, load_cards, update_readme, write_cards

    card_dir = Path(args.dir)
    if args.write:
        for path in write_cards(card_dir, args.models or None):
            print(f'wrote {path}')
    status = 0
    if args.check:
        cards = load_cards(card_dir)
        missing = sorted(set(fan_model_names()) - set(cards))
        problems = [f'{name}: no card' for name in missing]
        for card in cards.values():
            problems += card_differences(card)
        print('\n'.join(problems) if problems else f'{len(cards)} cards agree with the code')
        status = 1 if problems else 0
    if args.readme:
        changed = update_readme(Path(args.readme), load_cards(card_dir))
        print(f'{args.readme}: zoo table {"updated" if changed else "already up to date"}')
    return status


def demo_bench(out_dir: Path) -> None:
    """Demo step: ``fan bench --quick`` on the CPU, small batch, few steps (random weights)."""
    settings = BenchSettings(batch_size=2, warmup=1, repeats=3)
    print(f'fan bench --quick -b {settings.batch_size} --warmup {settings.warmup} --repeats {settings.repeats}: '
          f'the FAN tiny models and two timm baselines, random weights (cost does not depend on the weights; '
          f'a few steps on a shared CPU are a smoke test of the tool, not a reference measurement)')
    bench_dir = out_dir / 'bench'
    rows = run_benchmark(QUICK_MODELS, settings, bench_dir)
    print_report(rows, settings, bench_dir)
    failed = [r['model'] for r in rows if r.get('error')]
    if failed:
        raise RuntimeError(f'benchmark failed for {", ".join(failed)}')


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--resume', action='store_true',
                        help='keep the finished models of an earlier run in --out (same settings)')
    parser.add_argument('--timeout', type=positive_float, help='seconds at most per model and mode')


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'bench', help='measure params, GMACs, peak memory and throughput of FAN and timm models',
        description='Each model and mode runs in a fresh child process. Default models: the FAN zoo and the timm '
                    f'baselines; --quick: {", ".join(QUICK_MODELS)}. ' + GMACS_NOTE + '.')
    parser.add_argument('models', nargs='*', help='model names (name or name.tag) or globs, e.g. "fan_tiny_*"')
    parser.add_argument('--quick', action='store_true', help='the FAN tiny models and two baselines')
    parser.add_argument('--device', default='auto',
                        help='auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: %(default)s)')
    parser.add_argument('-b', '--batch-size', type=positive_int, help='batch size (default: 8 on CPU, 128 on CUDA)')
    parser.add_argument('--img-size', type=positive_int, help="resolution (default: each model's own input size)")
    parser.add_argument('--precision', default='fp32', choices=list(PRECISIONS),
                        help='fp32, or autocast to bf16 / fp16 (default: %(default)s)')
    parser.add_argument('--amp', dest='precision', action='store_const', const='bf16', help='same as --precision bf16')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--no-optimize', dest='optimize', action='store_false',
                        help='benchmark the plain models on the CPU too (default: with fan.optimize there)')
    parser.add_argument('--grad-checkpointing', action='store_true', help='gradient checkpointing when training')
    parser.add_argument('--threads', type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument('--warmup', type=non_negative_int, help='untimed steps (default: 2 on CPU, 10 on CUDA)')
    parser.add_argument('--repeats', type=positive_int,
                        help='timed steps, median reported (default: 5 on CPU, 20 on CUDA)')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES, help='what to time')
    parser.add_argument('--no-flops', action='store_true', help='skip the fvcore GMACs count')
    add_out_option(parser, 'bench-results')
    _run_options(parser)
    parser.set_defaults(func=_bench)

    parser = subparsers.add_parser(
        'bench-peers', help='FAN vs XCiT of the same size in one run: throughput, memory, checkpointing ratios')
    parser.add_argument('--pairs', nargs='+', metavar='FAN:PEER', help='model pairs (default: FAN-T/S-ViT vs XCiT-T/S)')
    parser.add_argument('-b', '--batch-size', type=positive_int, default=16, help='batch size (default: %(default)s)')
    parser.add_argument('--ckpt-batch-size', type=positive_int, default=32,
                        help='batch size of the gradient-checkpointing memory runs (default: %(default)s)')
    parser.add_argument('--threads', type=positive_int, default=2, help='torch CPU threads (default: %(default)s)')
    parser.add_argument('--warmup', type=non_negative_int, default=2, help='untimed steps (default: %(default)s)')
    parser.add_argument('--repeats', type=positive_int, default=5, help='timed steps (default: %(default)s)')
    add_out_option(parser, 'bench-peers')
    _run_options(parser)
    parser.set_defaults(func=_bench_peers)

    parser = subparsers.add_parser('cards', help='write / check the model cards, regenerate the README zoo table')
    parser.add_argument('--dir', default='models', help='card folder (default: %(default)s)')
    parser.add_argument('--write', action='store_true', help='regenerate the cards from the code (slow: fvcore)')
    parser.add_argument('models', nargs='*', help='with --write: only these models')
    parser.add_argument('--check', action='store_true', help='compare every card with the code (exit 1 if not)')
    parser.add_argument('--readme', nargs='?', const='README.md', help='rewrite the zoo table in this README')
    parser.set_defaults(func=_cards)

