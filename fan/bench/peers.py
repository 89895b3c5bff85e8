"""FAN against its timm peer of the same size (XCiT), measured in one run: throughput, training memory, and how
much gradient checkpointing saves.

Throughput is measured with the two models of a pair taking turns step by step in one child process, so both see
the same background load and their ratio holds on a shared machine. Peak memory needs a process per model: training
peak at the same batch (``memory/``), and the FAN models' training peak at a larger batch without and with gradient
checkpointing (``ckpt_off/``, ``ckpt_on/``). ``fan_vs_peer.csv`` holds one row of ratios per pair, with the
targets of the performance issue and what a direct port of the official code reached.
"""
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .child import run_in_child
from .measure import MODES, BenchSettings, measure_interleaved
from .runner import describe_machine, run_benchmark
from ..errors import UserError
from ..io import write_csv, write_json

__all__ = ['FAN_XCIT_PAIRS', 'TARGETS', 'pair_ratios', 'compare_with_peers']

FAN_XCIT_PAIRS: Tuple[Tuple[str, str], ...] = (
    ('fan_tiny_12_p16_224', 'xcit_tiny_12_p16_224'),
    ('fan_small_12_p16_224', 'xcit_small_12_p16_224'),
)
# Targets (FAN / peer; ckpt_mem_cut = 1 - peak with checkpointing / peak without, batch 32)
TARGETS: Dict[str, Dict[str, Tuple[str, float]]] = {
    'fan_tiny_12_p16_224': {'infer_ratio': ('>=', 0.70), 'train_ratio': ('>=', 0.95),
                            'train_mem_ratio': ('<=', 1.10), 'ckpt_mem_cut': ('>=', 0.40)},
    'fan_small_12_p16_224': {'infer_ratio': ('>=', 0.85), 'train_ratio': ('>=', 0.95),
                             'train_mem_ratio': ('<=', 1.10), 'ckpt_mem_cut': ('>=', 0.40)},
}
RATIO_COLUMNS = (
    'fan_model', 'peer_model', 'batch_size', 'threads',
    'fan_infer_samples_per_sec', 'peer_infer_samples_per_sec', 'infer_ratio',
    'fan_train_samples_per_sec', 'peer_train_samples_per_sec', 'train_ratio',
    'fan_train_peak_mem_mib', 'peer_train_peak_mem_mib', 'train_mem_ratio',
    'ckpt_batch_size', 'fan_ckpt_off_peak_mem_mib', 'fan_ckpt_on_peak_mem_mib', 'ckpt_mem_cut',
    'targets_met', 'targets_missed',
)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


def pair_ratios(fan_row: Dict[str, Any], peer_row: Dict[str, Any], ckpt_off_row: Dict[str, Any],
                ckpt_on_row: Dict[str, Any]) -> Dict[str, Any]:
    """One ratio row from benchmark rows: FAN and peer (same settings), FAN training without / with checkpointing."""
    fan_model, peer_model = fan_row['model'], peer_row['model']
    row: Dict[str, Any] = {'fan_model': fan_model, 'peer_model': peer_model,
                           'batch_size': fan_row['batch_size'], 'threads': fan_row['threads'],
                           'ckpt_batch_size': ckpt_on_row['batch_size']}
    for mode in ('infer', 'train'):
        fan_sps, peer_sps = fan_row.get(f'{mode}_samples_per_sec'), peer_row.get(f'{mode}_samples_per_sec')
        row.update({f'fan_{mode}_samples_per_sec': fan_sps, f'peer_{mode}_samples_per_sec': peer_sps,
                    f'{mode}_ratio': _ratio(fan_sps, peer_sps)})
    fan_mem, peer_mem = fan_row.get('train_peak_mem_mib'), peer_row.get('train_peak_mem_mib')
    row.update({'fan_train_peak_mem_mib': fan_mem, 'peer_train_peak_mem_mib': peer_mem,
                'train_mem_ratio': _ratio(fan_mem, peer_mem)})
    off, on = ckpt_off_row.get('train_peak_mem_mib'), ckpt_on_row.get('train_peak_mem_mib')
    row.update({'fan_ckpt_off_peak_mem_mib': off, 'fan_ckpt_on_peak_mem_mib': on,
                'ckpt_mem_cut': 1 - on / off if on is not None and off else None})
    met, missed = [], []
    for key, (op, target) in TARGETS.get(fan_model, {}).items():
        value = row[key]
        ok = value is not None and (value >= target if op == '>=' else value <= target)
        (met if ok else missed).append(f'{key} {op} {target:g}')
    row['targets_met'], row['targets_missed'] = '; '.join(met), '; '.join(missed)
    return row


def _interleaved_throughput(out_dir: Path, pairs: Sequence[Tuple[str, str]], settings: BenchSettings, resume: bool,
                            timeout: Optional[float]) -> Dict[str, Dict[str, Any]]:
    """Each pair's inference and training throughput, the two models taking turns step by step in one child process;
    merged by model. Saved to ``interleaved.json`` after every measurement (``resume`` reuses it, same settings)."""
    path = out_dir / 'interleaved.json'
    document = {'settings': asdict(settings), 'machine': describe_machine(settings.device), 'results': {}}
    if resume and path.exists():
        previous = json.loads(path.read_text())
        if previous['settings'] != document['settings']:
            raise UserError(f'{path} was measured with other settings; use another output folder or no resume')
        document['results'] = previous['results']
    for pair in pairs:
        for mode in MODES:
            key = f'{pair[0]} vs {pair[1]}: {mode}'
            if key not in document['results']:
                document['results'][key] = run_in_child(measure_interleaved, pair, mode, settings, timeout=timeout)
                write_json(path, document, indent=1)
    merged: Dict[str, Dict[str, Any]] = {}
    for result in document['results'].values():
        for model, values in result.items():
            merged.setdefault(model, {'model': model, 'batch_size': settings.batch_size,
                                      'threads': settings.threads}).update(values)
    return merged


def compare_with_peers(
        out_dir: Path,
        pairs: Sequence[Tuple[str, str]] = FAN_XCIT_PAIRS,
        settings: BenchSettings = BenchSettings(batch_size=16, threads=2),
        ckpt_batch_size: int = 32,
        resume: bool = False,
        timeout: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Measure every pair in one run and write ``out_dir/fan_vs_peer.csv``; returns its rows.

    Throughput: ``settings`` (warm-up, median of the timed steps), the FAN model and its peer taking turns step by
    step in one process (``interleaved.json``). Training peak memory: one child process per model, ``settings``
    (``memory/``; its training throughput, measured alone, is kept there too). Checkpointing: the FAN models'
    training peak over three steps at ``ckpt_batch_size``, without and with gradient checkpointing (``ckpt_off/``,
    ``ckpt_on/``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [m for pair in pairs for m in pair]
    fan_models = [fan_model for fan_model, _ in pairs]
    throughput = _interleaved_throughput(out_dir, pairs, settings, resume, timeout)
    # the resident peak still creeps up over the first steps (allocator), so memory runs as many steps as timing
    ckpt_settings = replace(settings, batch_size=ckpt_batch_size, warmup=0, repeats=3)
    passes = {}
    for folder, names, pass_settings in (
            ('memory', models, settings),
            ('ckpt_off', fan_models, ckpt_settings),
            ('ckpt_on', fan_models, replace(ckpt_settings, grad_checkpointing=True))):
        rows = run_benchmark(names, pass_settings, out_dir / folder, modes=('train',), count_flops=False,
                             resume=resume, timeout=timeout)
        passes[folder] = {r['model']: r for r in rows}
    ratios = []
    for fan_model, peer in pairs:
        fan_row, peer_row = (dict(throughput[m], train_peak_mem_mib=passes['memory'][m].get('train_peak_mem_mib'))
                             for m in (fan_model, peer))
        ratios.append(pair_ratios(fan_row, peer_row, passes['ckpt_off'][fan_model], passes['ckpt_on'][fan_model]))
    write_csv(out_dir / 'fan_vs_peer.csv',
              [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in ratios], RATIO_COLUMNS)
    return ratios
