"""Benchmark figures: throughput against parameters, GMACs against published ImageNet accuracy.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change). FAN models are
orange circles, the other timm models blue squares; every point is labelled with its model name.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ['plot_throughput_vs_params', 'plot_gmacs_vs_top1', 'write_plots']

_PLAIN = FuncFormatter(lambda value, _: f'{value:g}')  # 20, 50 rather than 2x10^1 on log axes


def _scatter(rows: Sequence[Dict[str, Any]], x_key: str, y_key: str, xlabel: str, ylabel: str, title: str,
             path: Path, log: bool = False) -> Optional[Path]:
    points = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not points:
        return None
    fig = Figure(figsize=(8, 5.5), layout='constrained')
    ax = fig.subplots()
    for is_fan, color, marker, label in ((True, 'tab:orange', 'o', 'FAN'), (False, 'tab:blue', 's', 'timm')):
        group = [r for r in points if r['model'].startswith('fan_') == is_fan]
        if group:
            ax.scatter([r[x_key] for r in group], [r[y_key] for r in group], c=color, marker=marker, label=label)
    for r in points:
        ax.annotate(r['model'], (r[x_key], r[y_key]), textcoords='offset points', xytext=(4, 3), fontsize=6)
    if log:
        for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
            set_scale('log')
            axis.set_major_formatter(_PLAIN)
            axis.set_minor_formatter(_PLAIN)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=150)
    return path


def plot_throughput_vs_params(rows: Sequence[Dict[str, Any]], settings: Dict[str, Any], path: Path,
                              mode: str = 'infer') -> Optional[Path]:
    """Images/s of ``mode`` against parameters (M), log-log. None when no row has both."""
    what = 'inference' if mode == 'infer' else 'training step'
    title = (f'{what} throughput: {settings["device"]}, {settings["dtype"]}, batch {settings["batch_size"]}'
             f'{", compiled" if settings["compile"] else ""} (median of {settings["repeats"]} steps)')
    return _scatter(rows, 'param_count_m', f'{mode}_samples_per_sec', 'parameters (M)', f'{what} images / s',
                    title, path, log=True)


def plot_gmacs_vs_top1(rows: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Published ImageNet-1K top-1 against fvcore GMACs per image. None when no row has both."""
    return _scatter(rows, 'gmacs', 'published_top1', 'GMACs per image (fvcore multiply-adds, attention counted)',
                    'published ImageNet-1K top-1 (%)', 'compute vs published accuracy (ImageNet-1K training, 224 px)',
                    path)


def write_plots(rows: Sequence[Dict[str, Any]], settings: Dict[str, Any], out_dir: Path) -> List[Path]:
    """Both figures into ``out_dir`` (throughput for inference and, when measured, training); the paths written."""
    written = [
        plot_throughput_vs_params(rows, settings, out_dir / 'throughput_vs_params.png', 'infer'),
        plot_throughput_vs_params(rows, settings, out_dir / 'train_throughput_vs_params.png', 'train'),
        plot_gmacs_vs_top1(rows, out_dir / 'gmacs_vs_top1.png'),
    ]
    return [p for p in written if p is not None]
