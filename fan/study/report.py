"""The Fashion-MNIST study's report: markdown tables (clean accuracy against the dataset's published anchors,
Fashion-MNIST-C, OOD detection, token spectra, LP-FT) and plots, from ``results.json``."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import UserError, require_extra
from ..io import write_atomic, write_json
from ..robustness.metrics import STANDARD_CORRUPTIONS

__all__ = ['ANCHORS', 'markdown_report', 'write_report']

# accuracies collected in the Fashion-MNIST README (zalandoresearch/fashion-mnist): quoted, not measured here
ANCHORS = (
    ('2-conv CNNs (several)', '-', '0.916-0.934'),
    ('2 conv + 3 FC', '1.8 M', '0.932'),
    ('DenseNet-BC', '768 K', '0.954'),
    ('WRN-40-4', '8.9 M', '0.967'),
)


def _table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _f(value: Optional[float], digits: int = 1) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _ranking(models: Dict[str, Dict[str, Any]], value, higher_is_better: bool) -> str:
    """Families from best to worst by ``value(model)`` (models without a value left out)."""
    ranked = sorted(((value(m), key) for key, m in models.items() if value(m) is not None),
                    reverse=higher_is_better)
    return (' > ' if higher_is_better else ' < ').join(models[key]['family'] for _, key in ranked)


def markdown_report(results: Dict[str, Any], command: str, machine: Dict[str, Any],
                    plots: Sequence[str] = ()) -> str:
    """The report as markdown; ``plots`` are file names beside it."""
    models = results['models']
    recipe = results['recipe']
    seeds = ', '.join(map(str, results['seeds']))
    total_minutes = sum(r['history']['epochs'][-1]['train_seconds'] for r in results['runs'].values()) / 60
    lines = [
        '# FAN on Fashion-MNIST: trained, measured, compared',
        '',
        f'Made by `{command}` ({machine.get("date", "")[:10]}; CPU: {machine.get("cpu")} '
        f'({machine.get("cpu_id")}, {machine.get("cpu_isa")}), {machine.get("cpu_count")} cores, torch '
        f'{machine.get("torch")}, timm {machine.get("timm")}). Every number below comes from `results.json` beside '
        'this file, which the command rewrites.',
        '',
        f'**Recipe** (every model): {recipe["epochs"]} epochs of the 60,000 training images, batch '
        f'{recipe["batch_size"]}, AdamW (lr {recipe["lr"]}, weight decay {recipe["weight_decay"]}, '
        f'{recipe["warmup_steps"]} warm-up steps, cosine to {recipe["min_lr"]}), label smoothing '
        f'{recipe["label_smoothing"]}, random shifts of up to {recipe["max_shift"]} px and horizontal flips; no '
        f'drop-path. Seeds: {seeds}. Training time of all runs on this machine: {total_minutes:.0f} min '
        '(`fan.optimize` on the CPU).',
        '',
        '## Clean accuracy (10,000 test images)',
        '',
        _table(('model', 'family', 'params (M)', 'input', 'top-1 (mean ± std over seeds)', 'per seed',
                'train img/s', 'min / epoch'),
               [(m['arch'], m['family'], f'{m["params"] / 1e6:.2f}', f'{m["img_size"]} px',
                 f'{m["top1_mean"]:.4f} ± {m["top1_std"]:.4f}',
                 ', '.join(f'{v:.4f}' for v in m['top1_per_seed'].values()), f'{m["train_img_s"]:.0f}',
                 f'{m["train_minutes"] / recipe["epochs"]:.2f}') for m in models.values()]),
        '',
        'Anchors from the Fashion-MNIST README (quoted, not measured here; longer training):',
        '',
        _table(('model', 'params', 'top-1'), list(ANCHORS)),
        '',
        f'Ranking by clean top-1: {_ranking(models, lambda m: m["top1_mean"], True)}.',
        '',
        '## Fashion-MNIST-C',
        '',
        f'{results["c_images"]} test images (seeded subset) x 15 corruptions x 5 severities, made by `fan make-c` at '
        f'28 px (JPEG quality 85, as ImageNet-C). '
        + ('Corruptions that could not apply at 28 px: ' + ', '.join(
            f'{c} ({why})' for c, why in results['c_not_applicable'].items()) + '.' if results['c_not_applicable']
           else 'All 15 corruptions apply at 28 px.')
        + ' CE is normalised by the ConvNet (ConvNet = 100, averaged over its seeds); retention = mean corrupted '
          'accuracy / clean accuracy on the same images. Means over seeds; lower mCE is better.',
        '',
        _table(('model', 'clean acc. (%)', 'mean corrupted acc. (%)', 'retention (%)', 'mCE', 'relative mCE'),
               [(m['arch'], _f(m['corruption']['clean_accuracy']), _f(m['corruption']['mean_accuracy']),
                 _f(m['corruption']['retention']), _f(m['corruption']['mce']), _f(m['corruption']['relative_mce']))
                for m in models.values()]),
        '',
        f'Ranking by mCE: {_ranking(models, lambda m: m["corruption"]["mce"], False)}.',
        '',
        'CE per corruption (ConvNet = 100):',
        '',
        _table(['model'] + [c.replace('_', ' ') for c in STANDARD_CORRUPTIONS],
               [[m['family']] + [_f(m['corruption']['ce'].get(c), 0) for c in STANDARD_CORRUPTIONS]
                for m in models.values()]),
        '',
        '## Out-of-distribution detection',
        '',
        'In-distribution: the first 2,000 test images; out-of-distribution: scikit-learn\'s 1,797 bundled 8 x 8 '
        'digits, upscaled to 28 px. Energy score on the pre-logits, as is and after ASH (`fan ood`); AUROC higher and '
        'FPR95 lower is better. Means over seeds.',
        '',
    ]
    scores = list(next(iter(models.values()))['ood'])
    lines += [_table(['model'] + [f'{s} AUROC / FPR95' for s in scores],
                     [[m['family']] + [f'{m["ood"][s]["auroc"]:.3f} / {m["ood"][s]["fpr95"]:.3f}' for s in scores]
                      for m in models.values()]), '',
              f'Ranking by energy AUROC: {_ranking(models, lambda m: m["ood"][scores[0]]["auroc"], True)}.', '']
    lines += ['## Token spectra: trained against untrained', '',
              'Per block, over 64 test images (first seed): effective rank of the token affinity spectrum and the '
              'eigengap estimate of the number of token clusters (`fan spectrum`\'s measures); FAN\'s claim is that '
              'training groups tokens into few clusters.', '']
    rows = []
    for m in models.values():
        spectrum = m.get('spectrum')
        if not spectrum:
            continue
        for trained, untrained in zip(spectrum['trained'], spectrum['untrained']):
            rows.append((m['family'], trained['block'], trained['tokens'],
                         f'{untrained["effective_rank"]:.2f} -> {trained["effective_rank"]:.2f}',
                         f'{untrained["clusters"]:.2f} -> {trained["clusters"]:.2f}'))
    lines += [_table(('model', 'block', 'tokens', 'effective rank (untrained -> trained)',
                      'clusters (untrained -> trained)'), rows), '']
    if results['transfer']:
        lines += ['## LP-FT: from classes 0-4 to classes 5-9', '',
                  'Each model trained with the recipe on the first five classes (first seed), then transferred to the '
                  'other five with `fan finetune`\'s LP, FT and LP-FT on 5,000 of their training images (2 epochs): '
                  'ID accuracy on their 5,000 test images, OOD accuracy on their Fashion-MNIST-C images at severity '
                  '3.', '',
                  _table(('model', 'LP ID / OOD', 'FT ID / OOD', 'LP-FT ID / OOD'),
                         [(models[key]['family'] if key in models else key,
                           *[f'{modes[mode]["id_accuracy"]:.4f} / {modes[mode]["ood_accuracy"]:.4f}'
                             for mode in ('lp', 'ft', 'lpft')])
                          for key, modes in results['transfer'].items()]), '']
    if results.get('weights'):
        lines += ['## Exported weights', '',
                  'The best seed of each FAN model, as float16 safetensors for the `fashion_mnist` pretrained tag '
                  '(`OUT/weights`): test top-1 of those weights through `fan eval --dataset torch/fashion_mnist` '
                  '(timm\'s data config). The weights that ship in the package may come from longer runs of the same '
                  'recipe (`--weights-only`); their model cards record how they were trained.', '',
                  _table(('weights', 'seed', 'test top-1', 'file'),
                         [(f'`{r["model"]}`', r['seed'], f'{r["test_top1"]:.4f}', r['file'])
                          for r in results['weights']]), '']
    if plots:
        lines += ['## Plots', ''] + [f'![{name}]({name})' for name in plots] + ['']
    return '\n'.join(lines)


def write_plots(results: Dict[str, Any], folder: Path) -> List[str]:
    """Accuracy bars (clean and corrupted) and CE per corruption; returns the file names (none without matplotlib)."""
    try:
        require_extra('matplotlib', 'analysis')
    except UserError:
        return []
    from matplotlib.figure import Figure

    models = results['models']
    names = [m['family'] for m in models.values()]
    figure = Figure(figsize=(12, 4.2))
    left, right = figure.subplots(1, 2)
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [100 * m['top1_mean'] for m in models.values()], 0.4,
             yerr=[100 * m['top1_std'] for m in models.values()], label='clean (10,000 images)')
    left.bar([i + 0.2 for i in x], [m['corruption']['mean_accuracy'] for m in models.values()], 0.4,
             label='Fashion-MNIST-C (mean of 75 cells)')
    left.set_xticks(list(x), names, rotation=30)
    left.set_ylabel('top-1 accuracy (%)')
    left.set_ylim(0, 100)
    left.legend(loc='lower right')
    for m in models.values():
        right.plot(range(len(STANDARD_CORRUPTIONS)), [m['corruption']['ce'].get(c) for c in STANDARD_CORRUPTIONS],
                   marker='o', label=m['family'])
    right.set_xticks(range(len(STANDARD_CORRUPTIONS)), [c.replace('_', ' ') for c in STANDARD_CORRUPTIONS],
                     rotation=60, ha='right')
    right.set_ylabel('CE (ConvNet = 100)')
    right.legend(fontsize=8)
    figure.tight_layout()
    name = 'accuracy_and_ce.png'
    figure.savefig(folder / name, dpi=110)
    return [name]


def write_report(results: Dict[str, Any], folder: Path, command: str, machine: Dict[str, Any]) -> Path:
    """``folder/README.md``, its plots, and the ``results.json`` it is made from."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / 'results.json', dict(results, command=command, machine=machine))
    plots = write_plots(results, folder)
    return write_atomic(folder / 'README.md', markdown_report(results, command, machine, plots) + '\n')
