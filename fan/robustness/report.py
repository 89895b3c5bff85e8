"""Human-readable views of an ImageNet-C results document: a markdown table and a heat map."""
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import require_extra
from .metrics import ALL_CORRUPTIONS, SEVERITIES, STANDARD_CORRUPTIONS

__all__ = ['markdown_report', 'plot_error_heatmap']


def _fmt(value: Optional[float], suffix: str = '') -> str:
    return '–' if value is None else f'{value:.2f}{suffix}'


def _corruptions(results: Dict) -> List[str]:
    return [c for c in ALL_CORRUPTIONS if c in results['error']]


def markdown_report(results: Dict) -> str:
    """Per-cell top-1 errors (rows: corruptions, columns: severities), CE, and the aggregates with caveats."""
    severities = [str(s) for s in SEVERITIES]
    lines = [
        f'# ImageNet-C: {results["model"]}',
        '',
        '| corruption | ' + ' | '.join(f'sev {s}' for s in severities) + ' | mean | CE | rel. CE |',
        '|---|' + '---:|' * (len(severities) + 3),
    ]
    for corruption in _corruptions(results):
        row = results['error'][corruption]
        values = list(row.values())
        extra = '' if corruption in STANDARD_CORRUPTIONS else ' (extra)'
        lines.append(f'| {corruption}{extra} | ' + ' | '.join(_fmt(row.get(s)) for s in severities)
                     + f' | {_fmt(sum(values) / len(values))} | {_fmt(results["ce"].get(corruption))}'
                     f' | {_fmt(results["relative_ce"].get(corruption))} |')
    lines += [
        '',
        'Cells are top-1 error in percent. CE is normalised by AlexNet (AlexNet = 100); the 4 extra corruptions '
        'have no AlexNet constant and never enter mCE.',
        '',
        f'- clean error: {_fmt(results["clean_error"], " %")} ({results["images"]["clean"] or 0} images)',
        f'- **mCE: {_fmt(results["mce"], " %")}** (lower is better; AlexNet-normalised error, standard 15)',
        f'- relative mCE: {_fmt(results["relative_mce"], " %")}',
        f'- **mean accuracy: {_fmt(results["mean_accuracy"], " %")}** over {results["corruption_set"]} '
        '(higher is better; the "IN-C" number of the FAN paper; not comparable with mCE)',
        f'- mean accuracy, 15 standard corruptions: {_fmt(results["mean_accuracy_standard"], " %")}',
        f'- retention (mean accuracy / clean accuracy): {_fmt(results["retention"], " %")}',
        f'- unreadable images skipped: {results["skipped_images"]}',
    ]
    if results['incomplete']:
        lines += ['', '**Incomplete aggregates** (reported as –):']
        lines += [f'- {name}: {why}' for name, why in results['incomplete'].items()]
    if results['missing']:
        lines += ['', '**Missing folders:**'] + [f'- {message}' for message in results['missing']]
    return '\n'.join(lines) + '\n'


def plot_error_heatmap(results: Dict, path: Path) -> None:
    """Save a corruption x severity heat map of top-1 error (percent); missing cells are blank."""
    Figure = require_extra('matplotlib.figure', 'plots').Figure

    corruptions = _corruptions(results)
    grid = np.full((len(corruptions), len(SEVERITIES)), np.nan)
    for row, corruption in enumerate(corruptions):
        for col, severity in enumerate(SEVERITIES):
            grid[row, col] = results['error'][corruption].get(str(severity), np.nan)
    fig = Figure(figsize=(5.5, 0.35 * len(corruptions) + 1.6))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap='magma_r', vmin=0, vmax=100, aspect='auto')
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f'{value:.0f}', ha='center', va='center', fontsize=7,
                    color='white' if value > 60 else 'black')
    ax.set_xticks(range(len(SEVERITIES)), [str(s) for s in SEVERITIES])
    ax.set_yticks(range(len(corruptions)), corruptions)
    ax.set_xlabel('severity')
    ax.set_title(f'{results["model"]}: top-1 error (%)\nmCE {_fmt(results["mce"])}, '
                 f'mean acc {_fmt(results["mean_accuracy"])}', fontsize=9)
    fig.colorbar(image, ax=ax, label='top-1 error (%)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
