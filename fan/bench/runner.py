"""The benchmark loop: every model and mode measured in its own child process, results saved after each model.

Output in ``out_dir``: ``bench.csv`` (one row per model) and ``bench.json`` (the same rows with every step time, the
settings and the machine); ``fan bench`` adds the figures of :mod:`fan.bench.plots`. A model that fails gets an
``error`` and the others still run; ``resume=True`` keeps the rows of an earlier run with the same settings.
"""
import json
import os
import platform
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from tqdm import tqdm

from .child import ChildError, run_in_child
from .measure import MODES, BenchSettings, measure
from .published import published_top1
from ..errors import UserError
from ..io import write_csv, write_json

__all__ = [
    'BASELINES', 'QUICK_MODELS', 'GMACS_NOTE', 'CSV_COLUMNS', 'default_models', 'resolve_models', 'describe_machine',
    'run_benchmark', 'format_table',
]

BASELINES = (
    'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224',
    'xcit_tiny_12_p16_224', 'xcit_small_12_p16_224',
    'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
    'convnext_tiny', 'convnext_small', 'convnext_base',
)
QUICK_MODELS = ('fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'deit_tiny_patch16_224', 'xcit_tiny_12_p16_224')
GMACS_NOTE = ('gmacs: fvcore count per image in G multiply-adds (one "flop" = one multiply-add, as timm reports '
              'gmacs and FAN reports GFLOPs), attention matmuls included (fused attention off while counting)')
CSV_COLUMNS = (
    'model', 'param_count_m', 'gmacs', 'published_top1', 'img_size', 'batch_size', 'device', 'dtype',
    'channels_last', 'compile', 'grad_checkpointing', 'threads',
    'infer_samples_per_sec', 'infer_step_ms', 'infer_peak_mem_mib',
    'train_samples_per_sec', 'train_step_ms', 'train_peak_mem_mib', 'error',
)
_DECIMALS = {'param_count_m': 2, 'gmacs': 3, 'published_top1': 1,
             'infer_samples_per_sec': 2, 'train_samples_per_sec': 2, 'infer_step_ms': 1, 'train_step_ms': 1,
             'infer_peak_mem_mib': 0, 'train_peak_mem_mib': 0}


def default_models() -> List[str]:
    """The FAN zoo (every registered ``fan_*`` model) followed by the timm baselines."""
    return timm.list_models('fan_*') + list(BASELINES)


def resolve_models(patterns: Sequence[str]) -> List[str]:
    """Model names (``name`` or ``name.tag``) and globs (``fan_tiny_*``) -> registered names, in order, once each."""
    names: List[str] = []
    for pattern in patterns:
        if any(c in pattern for c in '*?['):
            matches = timm.list_models(pattern)
            if not matches:
                raise UserError(f'no registered model matches {pattern!r}')
        elif timm.is_model(pattern):
            matches = [pattern]
        else:
            raise UserError(f'unknown model {pattern!r}: not registered with timm (see timm.list_models())')
        names += [m for m in matches if m not in names]
    return names


def describe_machine(device: str) -> Dict[str, Any]:
    """Where and when a benchmark ran: CPU (with its family and model numbers and the vector extensions that decide
    the matmul rate: AVX-512, AVX512-BF16, AMX), core count, GPU, library versions, date and 1-minute load average."""
    cpu, cpu_id, cpu_isa = platform.processor() or platform.machine(), None, None
    if Path('/proc/cpuinfo').exists():
        first = Path('/proc/cpuinfo').read_text().split('\n\n')[0]
        fields = dict(line.split(':', 1) for line in first.splitlines() if ':' in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu = fields.get('model name', cpu)
        if 'cpu family' in fields:
            cpu_id = f"family {fields['cpu family']} model {fields.get('model', '?')}"
        flags = fields.get('flags', '').split()
        cpu_isa = ' '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags) or None
    return {
        'cpu': cpu,
        'cpu_id': cpu_id,
        'cpu_isa': cpu_isa,
        'cpu_count': os.cpu_count(),
        'gpu': torch.cuda.get_device_name(torch.device(device)) if device.startswith('cuda') else None,
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
        'date': datetime.now().astimezone().isoformat(timespec='seconds'),
        'load_avg_1min': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
    }


def _load_previous(out_dir: Path, settings: BenchSettings) -> Dict[str, Dict[str, Any]]:
    """Rows without error of an earlier run in ``out_dir``, by model; that run must have used the same settings."""
    path = out_dir / 'bench.json'
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if previous.get('settings') != asdict(settings):
        raise UserError(f'{path} was measured with other settings ({previous.get("settings")}); '
                         f'use another output folder or run without resume')
    return {row['model']: row for row in previous['rows'] if not row.get('error')}


def _save(out_dir: Path, rows: List[Dict[str, Any]], settings: BenchSettings, machine: Dict[str, Any]) -> None:
    """Write bench.json and bench.csv (atomically, so an interrupted run leaves valid files)."""
    document = {'settings': asdict(settings), 'machine': machine, 'note': GMACS_NOTE, 'rows': rows}
    write_json(out_dir / 'bench.json', document, indent=1)
    write_csv(out_dir / 'bench.csv', [{k: _rounded(k, v) for k, v in row.items()} for row in rows], CSV_COLUMNS)


def _rounded(key: str, value: Any) -> Any:
    return round(value, _DECIMALS[key]) if key in _DECIMALS and isinstance(value, float) else value


def _measure_model(name: str, settings: BenchSettings, modes: Sequence[str], count_flops: bool,
                   timeout: Optional[float], bar: tqdm) -> Dict[str, Any]:
    row: Dict[str, Any] = {'model': name, **asdict(settings)}
    errors = []
    for i, mode in enumerate(modes):
        bar.set_postfix_str(f'{name} {mode}')
        try:
            row.update(run_in_child(measure, name, mode, settings, count_flops and i == 0, timeout=timeout))
        except (ChildError, TimeoutError) as e:
            errors.append(f'{mode}: {e}')
            if getattr(e, 'details', ''):
                row[f'{mode}_traceback'] = e.details
            tqdm.write(f'{name} {mode} failed: {e}')
        bar.update()
    if 'param_count' in row:
        row['param_count_m'] = row.pop('param_count') / 1e6
    row['published_top1'] = published_top1(name)
    if errors:
        row['error'] = '; '.join(errors)
    return row


def run_benchmark(
        models: Sequence[str],
        settings: BenchSettings,
        out_dir: Path,
        modes: Sequence[str] = MODES,
        count_flops: bool = True,
        resume: bool = False,
        timeout: Optional[float] = None,
        deadline: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Measure ``models`` (names or globs) in ``modes`` with ``settings``; returns the rows, one per model.

    Each (model, mode) runs in a fresh child process (``timeout`` seconds at most); the results are saved to
    ``out_dir`` after every model. ``count_flops`` adds fvcore GMACs (per image, attention counted). No model starts
    after ``deadline`` (a ``time.monotonic()`` value): the rows then hold the models measured before it.
    """
    names = resolve_models(models)
    unknown_modes = set(modes) - set(MODES)
    if unknown_modes or not modes:
        raise UserError(f'modes must be some of {", ".join(MODES)}, got {list(modes)}')
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _load_previous(out_dir, settings) if resume else {}
    machine = describe_machine(settings.device)
    rows = []
    with tqdm(total=len(modes) * sum(name not in previous for name in names), unit='run', desc='fan bench') as bar:
        for name in names:
            if name not in previous and deadline is not None and time.monotonic() > deadline:
                tqdm.write(f'time budget spent: {name} and the models after it were not measured')
                break
            rows.append(previous.get(name) or _measure_model(name, settings, modes, count_flops, timeout, bar))
            _save(out_dir, rows, settings, machine)
    machine['load_avg_1min_end'] = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    _save(out_dir, rows, settings, machine)
    return rows


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], headers: Optional[Sequence[str]] = None,
                 markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table); missing values print as '-'."""
    headers = list(headers or columns)
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    if markdown:
        lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
        return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in cells])
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(headers, widths)), '  '.join('-' * w for w in widths)]
    lines += ['  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return '\n'.join(line.rstrip() for line in lines)


def _cell(key: str, value: Any) -> str:
    if value is None or value == '':
        return '-'
    if isinstance(value, float):
        return f'{value:.{_DECIMALS.get(key, 2)}f}'
    return str(value)
