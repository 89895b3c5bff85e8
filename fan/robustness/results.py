"""The ImageNet-C results file: built from per-cell counts, written atomically, reloaded to resume.

Cells are named ``'clean'`` and ``'<corruption>/<severity>'``. The file keeps the raw counts of every
finished cell under ``cells`` (so a re-run skips them) next to the derived metrics.
"""
import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .evaluate import CellCounts
from .metrics import ALL_CORRUPTIONS, summarize_corruption_errors
from ..errors import UserError

__all__ = ['CLEAN', 'cell_name', 'parse_cell_name', 'build_imagenet_c_results',
           'load_finished_cells', 'top_k_percent']

CLEAN = 'clean'


def cell_name(corruption: str, severity: int) -> str:
    return f'{corruption}/{severity}'


def parse_cell_name(name: str) -> Tuple[str, int]:
    corruption, severity = name.split('/')
    return corruption, int(severity)


def top_k_percent(correct: int, images: int) -> Optional[float]:
    return 100.0 * correct / images if images else None


def build_imagenet_c_results(settings: Dict, cells: Dict[str, CellCounts], missing: List[str]) -> Dict:
    """The JSON document for the finished ``cells`` (see the README for every field)."""
    ordered = sorted(cells, key=lambda name: (name != CLEAN, name))
    empty = [name for name in ordered if not cells[name].images]
    errors: Dict[str, Dict[int, float]] = {}
    images: Dict[str, Dict[str, int]] = {}
    for name in ordered[1:] if CLEAN in cells else ordered:
        counts = cells[name]
        corruption, severity = parse_cell_name(name)
        images.setdefault(corruption, {})[str(severity)] = counts.images
        if counts.images:
            errors.setdefault(corruption, {})[severity] = 100.0 - top_k_percent(counts.top1_correct, counts.images)
    errors = {c: errors[c] for c in ALL_CORRUPTIONS if c in errors}
    images = {c: images[c] for c in ALL_CORRUPTIONS if c in images}
    clean = cells.get(CLEAN)
    clean_error = None
    if clean is not None and clean.images:
        clean_error = 100.0 - top_k_percent(clean.top1_correct, clean.images)
    summary = summarize_corruption_errors(errors, clean_error)
    if clean is None:
        summary['incomplete'].setdefault('clean_error', 'clean images not evaluated (--clean DIR)')
    if empty:
        summary['incomplete']['cells'] = 'no readable image in: ' + ', '.join(empty)
    return dict(
        settings,
        clean_error=clean_error,
        clean_accuracy=summary.pop('clean_accuracy'),
        clean_top5_error=None if clean_error is None else 100.0 - top_k_percent(clean.top5_correct, clean.images),
        error={c: {str(s): e for s, e in by_severity.items()} for c, by_severity in errors.items()},
        **summary,
        images=dict(clean=None if clean is None else clean.images, **images),
        skipped_images=sum(len(c.skipped) for c in cells.values()),
        skipped=[dict(cell=name, error=error) for name in ordered for error in cells[name].skipped],
        missing=missing,
        cells={name: asdict(cells[name]) for name in ordered},
    )


_BEFORE_THE_KEY = {'precision': 'fp32'}  # settings that files written before they were recorded had


def load_finished_cells(path: Path, settings: Dict) -> Tuple[Dict[str, CellCounts], Dict]:
    """Finished cells of an earlier run with the same settings (none if there is no file).

    ``clean_data`` may be added or left out on a re-run (the clean cell is then evaluated or kept).

    Returns:
        The finished cells and the settings to write (``settings`` with an earlier ``clean_data`` kept).

    Raises:
        ValueError: the file exists but was made with other settings, or is not a results file.
    """
    path = Path(path)
    if not path.exists():
        return {}, settings
    try:
        document = json.loads(path.read_text())
        cells = {name: CellCounts(**counts) for name, counts in document['cells'].items()}
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f'{path} exists but is not a readable results file ({error}); '
                         'use --force to overwrite it') from error
    settings = dict(settings, clean_data=settings.get('clean_data') or document.get('clean_data'))
    differences = [key for key in settings if document.get(key, _BEFORE_THE_KEY.get(key)) != settings[key]
                   and not (key == 'clean_data' and document.get(key) is None)]
    if differences:
        detail = '; '.join(f'{key}: file has {document.get(key)!r}, now {settings[key]!r}' for key in differences)
        raise UserError(f'{path} holds results for other settings ({detail}); use --force to start over '
                         'or choose another --out')
    return cells, settings
