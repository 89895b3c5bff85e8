"""The ``eval-c`` and ``eval`` driver, end to end: find the data, resume, evaluate, write the results.

Both run unchanged on one process or under ``torchrun --nproc_per_node N``; only rank 0 writes files.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .data import LabelledImage, find_imagenet_c_cells, imagenet_subset_indices, list_class_folders
from ..distributed import distributed_context
from .evaluate import CellCounts, ModelSpec, evaluate_cells
from .metrics import EXTRA_CORRUPTIONS, SEVERITIES, STANDARD_CORRUPTIONS
from .report import markdown_report, plot_error_heatmap
from .results import CLEAN, build_imagenet_c_results, cell_name, load_finished_cells, top_k_percent
from ..errors import MissingPathError, UserError
from ..io import write_atomic, write_json

__all__ = ['DATASETS', 'FASHION_MNIST', 'run_imagenet_c', 'run_classification', 'results_path']

FASHION_MNIST = 'torch/fashion_mnist'  # its 10,000 test images, read by timm's torch/fashion_mnist
DATASETS = ('imagenet', 'imagenet-a', 'imagenet-r', FASHION_MNIST)


def run_imagenet_c(
        model_spec: ModelSpec,
        data: Path,
        out: Path,
        clean: Optional[Path] = None,
        corruptions: Optional[Sequence[str]] = None,
        severities: Sequence[int] = SEVERITIES,
        force: bool = False,
        batch_size: int = 64,
        workers: int = 4,
        device: str = 'auto',
        precision: str = 'fp32',
) -> Dict:
    """Evaluate ``data/<corruption>/<severity>/<wnid>/*`` (and ``clean/<wnid>/*``) and write to the folder ``out``.

    ``out/imagenet_c.json`` is rewritten after every finished cell; a markdown table (``imagenet_c.md``) and a heat
    map (``imagenet_c.png``, with the ``plots`` extra) are written beside it at the end. A re-run with the same settings skips finished cells;
    ``force`` starts over. ``corruptions`` defaults to the 15 standard ones plus the 4 extra ones whose folders
    exist. Returns the results document.
    """
    out = Path(out) / 'imagenet_c.json'
    if corruptions is None:
        corruptions = STANDARD_CORRUPTIONS + tuple(c for c in EXTRA_CORRUPTIONS if (Path(data) / c).is_dir())
    with distributed_context(device) as context:
        model, data_config, transform = model_spec.build(context.device)
        cell_dirs, missing = find_imagenet_c_cells(data, corruptions, severities)
        if not cell_dirs and clean is None:
            raise MissingPathError(f'nothing to evaluate in {data}: ' + '; '.join(missing))
        cells = {cell_name(c, s): list_class_folders(folder) for (c, s), folder in cell_dirs.items()}
        if clean is not None:
            cells = {CLEAN: list_class_folders(clean), **cells}
        settings = dict(model_spec.settings(data_config), data=str(Path(data).resolve()),
                        clean_data=str(Path(clean).resolve()) if clean else None, precision=precision)

        finished, error = {}, None
        if context.is_main and not force:
            try:
                finished, settings = load_finished_cells(out, settings)
            except ValueError as exc:
                error = str(exc)
        finished, settings, error = context.broadcast((finished, settings, error))
        if error:
            raise UserError(error)
        if context.is_main:
            for message in missing:
                print(f'warning: missing {message}')
            if finished:
                print(f'resuming {out}: {len(finished)} finished cell(s) kept, '
                      f'{sum(name not in finished for name in cells)} to evaluate (--force starts over)')

        def on_cell_done(name: str, counts: CellCounts) -> None:
            finished[name] = counts
            if context.is_main:
                write_json(out, build_imagenet_c_results(settings, finished, missing))

        pending = {name: items for name, items in cells.items() if name not in finished}
        if context.is_main:
            print(f'evaluating {len(pending)} cell(s), {sum(map(len, pending.values()))} images, on '
                  f'{context.world_size} process(es) ({context.device})', flush=True)
        data_wait = evaluate_cells(model, transform, pending, context, on_cell_done,
                                   batch_size=batch_size, workers=workers, precision=precision)
        results = build_imagenet_c_results(settings, finished, missing)
        if context.is_main:
            write_json(out, results)
            write_atomic(out.with_suffix('.md'), markdown_report(results))
            try:
                plot_error_heatmap(results, out.with_suffix('.png'))
            except UserError as missing:  # the numbers are written; only the heat map needs the extra
                print(f'no heat map: {missing}')
            if pending:
                print(f'data loader wait: {100 * data_wait:.0f} % of rank-0 evaluation time')
    return results


def _fashion_mnist_test_items(data: Optional[Path]) -> Tuple[List[LabelledImage], str]:
    """The Fashion-MNIST test set as in-memory items (greyscale PIL images) and the folder it was read from."""
    from PIL import Image

    from ..data.fashion_mnist import fashion_mnist_root, load_fashion_mnist

    dataset = load_fashion_mnist(data)
    items = [LabelledImage(Path(f'{FASHION_MNIST}/test/{index}'), int(label), Image.fromarray(image.numpy(), 'L'))
             for index, (image, label) in enumerate(zip(dataset.test_images, dataset.test_labels))]
    return items, str(fashion_mnist_root(data).resolve())


def run_classification(
        model_spec: ModelSpec,
        dataset: str,
        data: Optional[Path],
        out: Optional[Path] = None,
        batch_size: int = 64,
        workers: int = 4,
        device: str = 'auto',
        precision: str = 'fp32',
) -> Dict:
    """Top-1/top-5 accuracy on an ImageNet-style folder ``data/<wnid>/*``, or on Fashion-MNIST's test set
    (``torch/fashion_mnist``: ``data`` holds its IDX files, or None for Debian's package; 10 classes).

    For 'imagenet-a' and 'imagenet-r' only the logits of their 200 classes compete (the official masks).
    Returns (and writes to the folder ``out`` as ``<dataset>.json``, '/' as '_', if given) a document with ``top1``,
    ``top5`` (percent) and counts.
    """
    if dataset not in DATASETS:
        raise UserError(f'unknown dataset {dataset!r}; choose from {DATASETS}')
    if data is None and dataset != FASHION_MNIST:
        raise UserError(f'{dataset} needs --data (a folder of <wnid>/ class folders)')
    class_subset = imagenet_subset_indices(dataset) if dataset in ('imagenet-a', 'imagenet-r') else None
    with distributed_context(device) as context:
        if dataset == FASHION_MNIST:
            items, data = _fashion_mnist_test_items(data)
            model, data_config, transform = model_spec.build(context.device, num_classes=10)
        else:
            model, data_config, transform = model_spec.build(context.device)
            items = list_class_folders(data, allowed_labels=class_subset)
        finished: Dict[str, CellCounts] = {}
        data_wait = evaluate_cells(model, transform, {dataset: items}, context, finished.__setitem__,
                                   batch_size=batch_size, workers=workers, precision=precision,
                                   class_subset=class_subset)
        counts = finished[dataset]
        if counts.images == 0:  # (every file unreadable: no accuracy to report, no results file)
            raise UserError(f'no readable image in {data}: all {len(counts.skipped)} file(s) were skipped '
                            f"(first: {counts.skipped[0] if counts.skipped else 'none'})")
        results = dict(
            model_spec.settings(data_config),
            dataset=dataset,
            data=str(Path(data).resolve()),
            classes=len({item.label for item in items}),
            top1=top_k_percent(counts.top1_correct, counts.images),
            top5=top_k_percent(counts.top5_correct, counts.images),
            images=counts.images,
            skipped_images=len(counts.skipped),
            skipped=counts.skipped,
        )
        if context.is_main:
            if out is not None:
                write_json(results_path(out, dataset), results)
            print(f'data loader wait: {100 * data_wait:.0f} % of rank-0 evaluation time')
    return results


def results_path(out: Path, dataset: str) -> Path:
    """Where ``fan eval`` writes a dataset's results: ``out/<dataset>.json`` ('/' as '_')."""
    return Path(out) / f'{dataset.replace("/", "_")}.json'
