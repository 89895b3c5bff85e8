"""Figures of the token-grouping analysis (in the spirit of the FAN paper's Fig. 3 and Fig. 4), several models each.

All functions take ``ModelReport``s (see ``report.py``) and write one PNG. Figures are built with
``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state or GUI backend is involved.
"""
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .report import AnalysisSettings, ModelReport

__all__ = ['plot_spectra', 'plot_depth_curves', 'plot_cluster_maps']

_SPECTRUM_FLOOR = 1e-8  # smallest normalised eigenvalue drawn on the log axis


def _relative_depth(report: ModelReport) -> np.ndarray:
    """(l + 1) / L for the L blocks, so models of different depth share one axis."""
    return np.arange(1, len(report.blocks) + 1) / len(report.blocks)


def plot_spectra(reports: Sequence[ModelReport], settings: AnalysisSettings, path: Path) -> None:
    """Normalised eigenvalue spectra ``lambda_i / lambda_max`` of every block: one row per model, clean | noisy."""
    fig = Figure(figsize=(10, 3.4 * len(reports)))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / (3.4 * len(reports)) + 0.05, top=0.95, hspace=0.45,
                        wspace=0.06)  # fixed margins: matplotlib's layout engines are slow with log axes
    axes = fig.subplots(len(reports), 2, squeeze=False, sharey=True)
    colormap = colormaps['viridis']
    for row, report in zip(axes, reports):
        num_blocks = len(report.blocks)
        for ax, kind in zip(row, ('clean', f'noisy (sigma={settings.sigma:g})')):
            for block in report.blocks:
                spectrum = block.spectrum_clean if kind == 'clean' else block.spectrum_noisy
                ax.plot(np.arange(1, len(spectrum) + 1), np.maximum(spectrum, _SPECTRUM_FLOOR), lw=1,
                        color=colormap(block.index / max(num_blocks - 1, 1)))
            ax.axhline(settings.rel_threshold, color='grey', ls='--', lw=0.8)
            ax.set_yscale('log')
            ax.set_ylim(_SPECTRUM_FLOOR, 2)
            ax.set_title(f'{report.model} ({report.weights}): {kind}', fontsize=9)
            ax.set_xlabel('eigenvalue index i')
        row[0].set_ylabel('lambda_i / lambda_max')
        colorbar = fig.colorbar(ScalarMappable(norm=Normalize(0, num_blocks - 1), cmap=colormap), ax=row.tolist())
        colorbar.locator = MaxNLocator(integer=True)
        colorbar.set_label('block')
    fig.savefig(path, dpi=110)


def plot_depth_curves(reports: Sequence[ModelReport], settings: AnalysisSettings, path: Path) -> None:
    """Against relative depth: significant-eigenvalue count, eigengap cluster count and noise ratio (image means)."""
    fig = Figure(figsize=(15, 4))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.96, wspace=0.25)
    axes = fig.subplots(1, 3)
    for report in reports:
        depth = _relative_depth(report)
        color = axes[0].plot(depth, [np.mean(b.significant_clean) for b in report.blocks], 'o-',
                             label=f'{report.model} clean')[0].get_color()
        axes[0].plot(depth, [np.mean(b.significant_noisy) for b in report.blocks], 'x--', color=color,
                     label=f'{report.model} noisy')
        axes[1].plot(depth, [np.mean(b.num_clusters_clean) for b in report.blocks], 'o-', color=color)
        axes[1].plot(depth, [np.mean(b.num_clusters_noisy) for b in report.blocks], 'x--', color=color)
        axes[2].plot(depth, [np.mean(b.noise_ratio) for b in report.blocks], 'o-', color=color,
                     label=f'{report.model} ({report.weights})')
    axes[0].set_ylabel(f'significant eigenvalues (>= {settings.rel_threshold:g} lambda_max)')
    axes[1].set_ylabel(f'eigengap cluster count (k <= {settings.max_k})')
    axes[2].set_ylabel(f'||Z(x+n) - Z(x)|| / ||Z(x)||, sigma={settings.sigma:g}')
    for ax in axes:
        ax.set_xlabel('relative depth (block / number of blocks)')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_cluster_maps(
        reports: Sequence[ModelReport],
        views: Sequence[np.ndarray],
        image_index: int,
        num_clusters: int,
        title: str,
        path: Path,
) -> None:
    """Spectral-cluster maps of one image: one row per model, the image then one overlay per chosen block.

    Args:
        views: per model, the image as that model saw it, (H, W, 3) floats in [0, 1].
        image_index: position of the image in the per-image lists of the reports.
        num_clusters: number of cluster labels (picks a qualitative colour map with enough colours).
    """
    colormap, num_colors = ('tab10', 10) if num_clusters <= 10 else ('tab20', 20)
    columns = 1 + max(sum(b.cluster_maps is not None for b in r.blocks) for r in reports)
    fig = Figure(figsize=(2.4 * columns, 2.5 * len(reports) + 0.6))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / (2.5 * len(reports) + 0.6), wspace=0.04,
                        hspace=0.12)
    axes = fig.subplots(len(reports), columns, squeeze=False)
    for row, report, view in zip(axes, reports, views):
        height, width = view.shape[:2]
        row[0].imshow(view)
        row[0].set_title(report.model, fontsize=8)
        mapped = [b for b in report.blocks if b.cluster_maps is not None]
        for ax, block in zip(row[1:], mapped):
            ax.imshow(view)
            ax.imshow(np.asarray(block.cluster_maps[image_index]), cmap=colormap, vmin=0, vmax=num_colors - 1,
                      alpha=0.55, interpolation='nearest', extent=(0, width, height, 0))
            ax.set_title(f'block {block.index}', fontsize=8)
        for ax in row:
            ax.axis('off')
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
