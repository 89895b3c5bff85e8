"""The measurements of the Fashion-MNIST study, on the trained runs: clean accuracy, Fashion-MNIST-C, ASH OOD
detection, token spectra and LP-FT. Each one is written per run as it finishes (``runs/<run>/*.json``), so the study
resumes; ``results.json`` and the report (``README.md`` and plots, ``report.py``) are built from those files.
"""
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from ..data.fashion_mnist import FashionMnist
from ..io import save_torch, write_json
from ..robustness.corrupt import make_imagenet_c
from ..robustness.metrics import SEVERITIES, STANDARD_CORRUPTIONS, summarize_corruption_errors
from .training import Recipe, StudyModel, build_model, class_subset, predict, prepare_batch, run_name

__all__ = ['load_run', 'fashion_mnist_c', 'corruption_errors', 'digits_ood_images', 'ood_scores',
           'evaluate_study', 'OOD_SHAPINGS', 'C_SEED']

C_SEED = 0  # Fashion-MNIST-C: the seed of the test-image subset and of make-c
OOD_SHAPINGS = (('none', 0.), ('ash_s', 90.), ('ash_b', 90.))  # energy score after each (shaping, percentile)
OOD_ID_IMAGES = 2000  # in-distribution images of the OOD test (the first of the test set)
SPECTRUM_IMAGES = 64


def load_run(spec: StudyModel, run_dir: Path, device: torch.device, num_classes: int = 10) -> nn.Module:
    """A finished run's model (its final weights) in eval mode on ``device`` (after ``fan.optimize`` on the CPU)."""
    from .. import optimize

    model = build_model(spec, num_classes=num_classes)
    model.load_state_dict(torch.load(run_dir / 'weights.pth', map_location='cpu', weights_only=True))
    model.to(device)
    return (optimize(model) if device.type == 'cpu' else model).eval()


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``path``'s JSON if it exists, else ``compute()`` written there."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST-C
# ---------------------------------------------------------------------------------------------------------------

def fashion_mnist_c(out: Path, data: FashionMnist, count: int, workers: int = 2) -> Dict[str, Any]:
    """Fashion-MNIST-C from ``count`` test images (a seeded subset), made by ``fan make-c`` at the native 28 px:
    the 15 standard corruptions x 5 severities, saved as JPEG like ImageNet-C, then read back (greyscale) into
    ``out/fashion_mnist_c.pt``. Returns {'clean': (N, 28, 28) uint8, 'labels': (N,), 'cells': {corruption:
    (5, N, 28, 28) uint8}, 'not_applicable': {corruption: why}}."""
    cache = out / 'fashion_mnist_c.pt'
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    indices = torch.randperm(len(data.test_images), generator=torch.Generator().manual_seed(C_SEED))[:count]
    source, generated = out / 'fashion_mnist_c_source', out / 'fashion_mnist_c'
    names = []
    for index in indices.tolist():
        name = f'{data.test_labels[index].item()}/{index:05d}'
        names.append(name)
        path = source / f'{name}.png'
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.test_images[index].numpy(), 'L').save(path)
    manifest = make_imagenet_c(source, generated, STANDARD_CORRUPTIONS, SEVERITIES, seed=C_SEED, size=0,
                               workers=workers)
    cells = {}
    for corruption in STANDARD_CORRUPTIONS:
        if corruption in manifest['not_applicable']:
            continue
        cells[corruption] = torch.stack([torch.stack([
            torch.from_numpy(np.array(Image.open(generated / corruption / str(severity) / f'{name}.JPEG').convert('L')))
            for name in names]) for severity in SEVERITIES])
    result = {'clean': data.test_images[indices], 'labels': data.test_labels[indices], 'cells': cells,
              'not_applicable': manifest['not_applicable']}
    save_torch(cache, result)
    return result


def corruption_errors(model: nn.Module, spec: StudyModel, c_set: Dict[str, Any]) -> Dict[str, Any]:
    """Top-1 error (percent) of ``model`` per corruption and severity, and on the clean subset (one pass over all)."""
    labels, corruptions = c_set['labels'], list(c_set['cells'])
    images = torch.cat([c_set['clean']] + [c_set['cells'][c].flatten(0, 1) for c in corruptions])
    wrong = (predict(model, images, spec.img_size) != labels.repeat(1 + len(SEVERITIES) * len(corruptions)))
    wrong = wrong.view(-1, len(labels)).float().mean(1).mul(100).tolist()  # clean, then per corruption and severity
    errors = {c: {str(s): wrong[1 + i * len(SEVERITIES) + j] for j, s in enumerate(SEVERITIES)}
              for i, c in enumerate(corruptions)}
    return {'clean_error': wrong[0], 'errors': errors}


def _int_severities(errors: Dict[str, Dict[str, float]]) -> Dict[str, Dict[int, float]]:
    return {c: {int(s): e for s, e in cells.items()} for c, cells in errors.items()}


# ---------------------------------------------------------------------------------------------------------------
# OOD: scikit-learn's bundled 8 x 8 digits, upscaled
# ---------------------------------------------------------------------------------------------------------------

def digits_ood_images(size: int = 28) -> torch.Tensor:
    """scikit-learn's 1,797 handwritten 8 x 8 digits (bundled, offline) as uint8 (N, size, size), white on black like
    Fashion-MNIST, upscaled bilinearly."""
    from sklearn.datasets import load_digits

    from torchvision.transforms.v2 import functional as TF

    digits = torch.from_numpy(load_digits().images).float().mul(255 / 16).unsqueeze(1)
    upscaled = TF.resize(digits, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return upscaled.round().clamp(0, 255).to(torch.uint8).squeeze(1)


@torch.inference_mode()
def ood_scores(model: nn.Module, spec: StudyModel, id_images: torch.Tensor, ood_images: torch.Tensor
               ) -> Dict[str, Dict[str, float]]:
    """AUROC / FPR95 (ID positive) of the energy score after each of ``OOD_SHAPINGS`` (``fan.ood``'s detector, on
    pre-logits computed once per image)."""
    from ..ood import AshDetector, energy, ood_metrics, shaping_label

    device = next(model.parameters()).device
    pre_logits = [torch.cat([model.forward_head(model.forward_features(
        prepare_batch(images[i:i + 500], spec.img_size).to(device)), pre_logits=True)
        for i in range(0, len(images), 500)]) for images in (id_images, ood_images)]
    results = {}
    for shaping, percentile in OOD_SHAPINGS:
        detector = AshDetector(model, shaping, percentile)
        scores = [energy(detector.classifier(detector.shape(features))).cpu() for features in pre_logits]
        label = 'energy' if shaping == 'none' else shaping_label(shaping, percentile, False)
        results[label] = ood_metrics(*scores)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Token spectra: trained against untrained
# ---------------------------------------------------------------------------------------------------------------

def spectrum_summary(model: nn.Module, spec: StudyModel, images: torch.Tensor) -> List[Dict[str, float]]:
    """Per block: mean effective rank, significant-eigenvalue count and eigengap cluster count of its tokens."""
    from ..analysis.blocks import block_spectra

    spectra = block_spectra(model.eval(), prepare_batch(images, spec.img_size).to(next(model.parameters()).device))
    return [{'block': index, 'tokens': int(s.eigenvalues.shape[1]),
             'effective_rank': float(s.effective_rank.float().mean()),
             'significant': float(s.significant.float().mean()),
             'clusters': float(s.num_clusters.float().mean())} for index, s in enumerate(spectra)]


def trained_and_untrained_spectra(model: nn.Module, spec: StudyModel, seed: int, data: FashionMnist,
                                  device: torch.device) -> Dict[str, List[Dict[str, float]]]:
    """The spectra of the trained model and of the same model at its random initialisation (``seed``)."""
    images = data.test_images[:SPECTRUM_IMAGES]
    torch.manual_seed(seed)
    untrained = build_model(spec).to(device).eval()
    return {'trained': spectrum_summary(model, spec, images), 'untrained': spectrum_summary(untrained, spec, images)}


# ---------------------------------------------------------------------------------------------------------------
# LP-FT: from the first half of the classes to the second
# ---------------------------------------------------------------------------------------------------------------

def transfer_runs(model: nn.Module, spec: StudyModel, data: FashionMnist, c_set: Dict[str, Any],
                  classes: Sequence[int], out: Path, train_images: int, epochs: int) -> Dict[str, Dict]:
    """LP, FT and LP-FT (``fan.finetune``) of a model trained on other classes to ``classes``: ``train_images`` of
    their training images, their test images as validation (ID), their Fashion-MNIST-C images at severity 3 (every
    corruption) as OOD. Returns {mode: results} (each also in ``out/<mode>/results.json``)."""
    from torch.utils.data import TensorDataset

    from ..finetune import MODES, TransferData, run_transfer

    images, labels = class_subset(data.train_images, data.train_labels, tuple(classes))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(C_SEED))[:train_images]
    test_images, test_labels = class_subset(data.test_images, data.test_labels, tuple(classes))
    ood = torch.cat([cells[SEVERITIES.index(3)] for cells in c_set['cells'].values()])
    ood_images, ood_labels = class_subset(ood, c_set['labels'].repeat(len(c_set['cells'])), tuple(classes))

    def dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset(prepare_batch(x, spec.img_size), y)

    train = dataset(images[order], labels[order])
    transfer_data = TransferData([str(c) for c in classes], train, train, dataset(test_images, test_labels),
                                 dataset(ood_images, ood_labels))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for mode in MODES:
        path = out / mode / 'results.json'
        if path.is_file():
            results[mode] = json.loads(path.read_text())
            continue
        model.load_state_dict(state)  # (both halves have 5 classes: the head keeps its shape)
        results[mode] = run_transfer(model, transfer_data, mode, out / mode, epochs=epochs, batch_size=128,
                                     workers=0, device=str(next(model.parameters()).device),
                                     cs=tuple(np.logspace(-4, 2, 13)))
    return results


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation and its summary
# ---------------------------------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.)


def evaluate_study(out: Path, specs: Sequence[StudyModel], seeds: Sequence[int], data: FashionMnist,
                   recipe: Recipe, c_images: int, transfer: Sequence[Tuple[StudyModel, int, Tuple[int, ...]]],
                   device: torch.device, reference: str) -> Dict[str, Any]:
    """Measure every finished run (cached per run) and summarise per model (mean and spread over seeds).

    Fashion-MNIST-C errors are normalised by the ``reference`` model's (the ConvNet's, averaged over its seeds):
    CE_c = sum_s E_s / sum_s E_s(reference), mCE their mean, relative mCE from the errors above the clean error.
    ``transfer`` lists (model, seed, source classes) runs for LP-FT to the other classes.
    """
    c_set = fashion_mnist_c(out, data, c_images)
    ood_images = digits_ood_images()
    runs: Dict[str, Dict[str, Any]] = {}
    jobs = [(spec, seed) for spec in specs for seed in seeds]
    for spec, seed in tqdm(jobs, desc='measuring runs', unit='run'):
        run_dir = out / 'runs' / run_name(spec, seed)
        history = json.loads((run_dir / 'history.json').read_text())
        model = load_run(spec, run_dir, device)
        runs[run_name(spec, seed)] = {
            'model': spec.key, 'seed': seed, 'history': history,
            'corruption': _cached(run_dir / 'corruption.json', lambda: corruption_errors(model, spec, c_set)),
            'ood': _cached(run_dir / 'ood.json', lambda: ood_scores(
                model, spec, data.test_images[:OOD_ID_IMAGES], ood_images)),
        }
        if seed == seeds[0]:
            runs[run_name(spec, seed)]['spectrum'] = _cached(
                run_dir / 'spectrum.json', lambda: trained_and_untrained_spectra(model, spec, seed, data, device))

    transfers = {}
    for spec, seed, classes in transfer:
        source = out / 'runs' / run_name(spec, seed, classes)
        target = tuple(c for c in range(10) if c not in classes)
        model = load_run(spec, source, device, num_classes=len(classes))
        transfers[spec.key] = transfer_runs(model, spec, data, c_set, target, out / 'transfer' / spec.key,
                                            train_images=5000, epochs=2)

    summary = summarize(runs, specs, reference, c_set)
    document = {'recipe': recipe.__dict__, 'seeds': list(seeds), 'c_images': c_images,
                'c_not_applicable': c_set['not_applicable'], 'models': summary,
                'transfer': _transfer_summary(transfers),
                'runs': runs}
    write_json(out / 'results.json', document)
    return document


def summarize(runs: Dict[str, Dict[str, Any]], specs: Sequence[StudyModel], reference: str,
              c_set: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per model: clean top-1 (mean, std, per seed), training speed, Fashion-MNIST-C (CE against the reference,
    mCE, relative mCE, mean corrupted accuracy, retention) and OOD (per score: AUROC, FPR95), all means over seeds."""
    by_model = {spec.key: [r for r in runs.values() if r['model'] == spec.key] for spec in specs}

    def mean_cells(model_runs: List[Dict[str, Any]]) -> Tuple[Dict[str, Dict[int, float]], float]:
        errors = _int_severities(model_runs[0]['corruption']['errors'])
        cells = {c: {s: statistics.fmean(_int_severities(r['corruption']['errors'])[c][s] for r in model_runs)
                     for s in errors[c]} for c in errors}
        return cells, statistics.fmean(r['corruption']['clean_error'] for r in model_runs)

    reference_errors, reference_clean = mean_cells(by_model[reference])
    summary = {}
    for spec in specs:
        model_runs = by_model[spec.key]
        if not model_runs:
            continue
        finals = [r['history']['epochs'][-1] for r in model_runs]
        top1 = [f['test_top1'] for f in finals]
        errors, clean_error = mean_cells(model_runs)
        corruption = summarize_corruption_errors(errors, clean_error, reference_errors=reference_errors,
                                                 reference_clean_error=reference_clean)
        ood = {score: {metric: _mean_std([r['ood'][score][metric] for r in model_runs])[0]
                       for metric in ('auroc', 'fpr95')} for score in model_runs[0]['ood']}
        summary[spec.key] = {
            'family': spec.family, 'arch': spec.arch, 'params': model_runs[0]['history']['params'],
            'img_size': spec.img_size,
            'top1_mean': _mean_std(top1)[0], 'top1_std': _mean_std(top1)[1],
            'top1_per_seed': {str(r['seed']): f['test_top1'] for r, f in zip(model_runs, finals)},
            'train_img_s': statistics.fmean(f['train_img_s'] for f in finals),
            'train_minutes': statistics.fmean(f['train_seconds'] for f in finals) / 60,
            'corruption': {k: corruption[k] for k in ('mce', 'relative_mce', 'mean_accuracy', 'retention', 'ce',
                                                      'clean_accuracy', 'incomplete')},
            'ood': ood,
            'spectrum': next((r['spectrum'] for r in model_runs if 'spectrum' in r), None),
        }
    return summary


def _transfer_summary(transfers: Dict[str, Dict[str, Dict]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    return {key: {mode: {'id_accuracy': r['id_accuracy'], 'ood_accuracy': r.get('ood_accuracy'),
                         'id_distortion': r['id_distortion'], 'ood_distortion': r.get('ood_distortion')}
                  for mode, r in modes.items()} for key, modes in transfers.items()}
