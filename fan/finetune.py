"""LP-FT: linear probing, then fine-tuning from the probe's head (Kumar et al., ICLR 2022, arXiv 2202.10054).

Three transfer modes for any timm / FAN model on an ImageFolder dataset (``DATA/train``, ``DATA/val``, one
sub-folder per class):

* ``lp``: logistic regression on frozen pre-logit features, its L2 strength C swept over ``np.logspace(-7, 2, 50)``
  and chosen on the validation split; the probe becomes the model's classifier.
* ``ft``: full fine-tuning from a freshly initialised classifier.
* ``lpft``: the ``lp`` probe first, then full fine-tuning from its head with a small learning rate.

Fine-tuning follows the paper's recipe: SGD with momentum 0.9 and no weight decay, cosine schedule over all steps,
cross-entropy, the epoch with the best validation accuracy kept. By default the network stays in ``eval()`` while it
trains (the paper's "valmode"): BatchNorm running statistics are frozen and dropout / drop-path are off, while all
parameters, BatchNorm's affine ones included, receive gradients.

Reported: ID (validation) and OOD accuracy, and feature distortion, the mean L2 distance between the pre-logit
features ``model.forward_head(model.forward_features(x), pre_logits=True)`` before and after transfer, averaged
over the ID validation images and over the OOD images. The paper's claim is that LP-FT changes features less
than FT, and so keeps ID and OOD features consistent.
"""
import argparse
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm


from .errors import MissingPathError, UserError, require_extra
from .factory import create_image_transform, create_model, resolve_data_config
from .io import save_torch, write_json
from .options import (add_data_option, add_model_options, add_out_option, add_run_options, model_from_args,
                      positive_float, positive_int, resolve_device, seed_everything)

__all__ = [
    'MODES', 'DEFAULT_CS', 'DEFAULT_LR', 'LinearProbe', 'TransferData', 'load_image_folders', 'extract_features',
    'fit_linear_probe', 'set_linear_classifier', 'fine_tune', 'feature_distortion', 'run_transfer',
]

MODES = ('lp', 'ft', 'lpft')
DEFAULT_CS = tuple(np.logspace(-7, 2, 50))  # inverse L2 strengths, small to large, as in the paper's code
DEFAULT_LR = {'ft': 1e-3, 'lpft': 1e-5}  # LP-FT uses a learning rate about 100x below plain fine-tuning
MOMENTUM = 0.9
WEIGHT_DECAY = 0.


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TransferData:
    """ImageFolder splits sharing one class list; ``train`` may augment, the others use the eval transform."""
    classes: List[str]
    train: ImageFolder
    train_eval: ImageFolder  # the training images through the eval transform, for the probe's features
    val: ImageFolder
    ood: Optional[ImageFolder] = None


def _image_folder(root: Path, transform: Callable, class_to_idx: Optional[Dict[str, int]] = None) -> ImageFolder:
    """An ImageFolder whose targets follow ``class_to_idx`` (the training split's), so that splits may hold fewer
    classes than training."""
    if not root.is_dir():
        raise MissingPathError(f'folder not found: {root} (expected one sub-folder of images per class)')
    folder = ImageFolder(str(root), transform=transform)
    if class_to_idx is not None:
        unknown = sorted(set(folder.classes) - set(class_to_idx))
        if unknown:
            raise UserError(f'{root} has classes missing from the training split: {", ".join(unknown)}')
        folder.samples = [(path, class_to_idx[folder.classes[target]]) for path, target in folder.samples]
        folder.targets = [target for _, target in folder.samples]
        folder.classes, folder.class_to_idx = list(class_to_idx), dict(class_to_idx)
    return folder


def load_image_folders(data_dir: str, transform: Callable, train_transform: Callable,
                       ood_dir: Optional[str] = None) -> TransferData:
    """``data_dir/train`` and ``data_dir/val`` (and an optional OOD folder with the same class names)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise MissingPathError(f'dataset folder not found: {data_dir}')
    missing = [split for split in ('train', 'val') if not (root / split).is_dir()]
    if missing:
        raise MissingPathError(f'incomplete dataset {data_dir}: no {" or ".join(missing)} folder '
                                '(expected DATA/train/<class>/* and DATA/val/<class>/*)')
    train = _image_folder(root / 'train', train_transform)
    if len(train.classes) < 2:
        raise UserError(f'{root / "train"} needs at least two class folders, found {train.classes}')
    return TransferData(
        classes=train.classes,
        train=train,
        train_eval=_image_folder(root / 'train', transform, train.class_to_idx),
        val=_image_folder(root / 'val', transform, train.class_to_idx),
        ood=_image_folder(Path(ood_dir), transform, train.class_to_idx) if ood_dir else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------------

def _classifier(model: nn.Module) -> nn.Linear:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f'{type(model).__name__}.get_classifier() is a {type(head).__name__}, not a single Linear '
                        'layer: a linear probe cannot be written into it')
    return head


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device,
                     desc: str = 'features') -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-logit features (N, D), logits (N, num_classes) and labels (N,) of a labelled loader, in eval mode."""
    model.eval()
    features, logits, labels = [], [], []
    for images, targets in tqdm(loader, desc=desc, leave=False):
        pre_logits = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
        features.append(pre_logits.float().cpu())
        logits.append(model.get_classifier()(pre_logits).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


@dataclass
class LinearProbe:
    """Multinomial logistic regression on raw (unstandardised) features: logits = features @ weight.T + bias."""
    weight: torch.Tensor  # (num_classes, D)
    bias: torch.Tensor  # (num_classes,)
    c: float  # chosen inverse L2 strength
    val_accuracy: float
    sweep: List[Dict[str, float]]  # {'c', 'val_accuracy', 'val_loss'} for every C tried


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                     val_labels: torch.Tensor, num_classes: int, cs: Sequence[float] = DEFAULT_CS) -> LinearProbe:
    """Sweep C (warm-started, small to large) and keep the best validation accuracy, ties going to the lower
    validation log-loss. Features (N, D) are standardised with one scalar mean and std of the training features;
    the chosen weights are mapped back to raw-feature space."""
    x_train, y_train = train_features.double().numpy(), train_labels.numpy()
    x_val, y_val = val_features.double().numpy(), val_labels.numpy()
    present = np.unique(y_train)
    if not np.array_equal(present, np.arange(num_classes)):
        raise UserError(f'the training features cover classes {present.tolist()}, '
                         f'expected all of 0..{num_classes - 1}')
    mean, std = x_train.mean(), x_train.std()
    if std == 0:
        raise UserError('the training features are constant: nothing to probe')
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    sklearn = require_extra('sklearn', 'analysis')
    import sklearn.exceptions
    import sklearn.linear_model
    import sklearn.metrics

    classifier = sklearn.linear_model.LogisticRegression(warm_start=True, max_iter=200)
    sweep, best, best_key = [], None, None
    for c in cs:
        classifier.set_params(C=float(c))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', sklearn.exceptions.ConvergenceWarning)  # the smallest C values rarely matter
            classifier.fit(x_train, y_train)
        accuracy = float(classifier.score(x_val, y_val))
        loss = float(sklearn.metrics.log_loss(y_val, classifier.predict_proba(x_val), labels=classifier.classes_))
        sweep.append({'c': float(c), 'val_accuracy': accuracy, 'val_loss': loss})
        if best_key is None or (accuracy, -loss) > best_key:
            best_key, best = (accuracy, -loss), (float(c), classifier.coef_.copy(), classifier.intercept_.copy())
    c, coef, intercept = best
    if num_classes == 2:  # sklearn's single binary row w becomes [-w/2, +w/2]: softmax then equals the sigmoid
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = coef / std
    bias = intercept - weight.sum(axis=1) * mean
    return LinearProbe(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), c, best_key[0], sweep)


def set_linear_classifier(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Replace the model's classifier by a Linear layer holding weight (num_classes, D) and bias (num_classes,)."""
    model.reset_classifier(weight.shape[0])
    head = _classifier(model)
    if head.weight.shape != weight.shape:
        raise UserError(f'probe weight {tuple(weight.shape)} does not fit the classifier {tuple(head.weight.shape)}')
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------------------

def _accuracy(model: nn.Module, loader: DataLoader, device: torch.device, desc: str) -> float:
    _, logits, labels = extract_features(model, loader, device, desc)
    return float((logits.argmax(dim=1) == labels).float().mean())


def fine_tune(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, epochs: int, lr: float,
              device: torch.device, out_dir: Path, eval_mode: bool = True, resume: bool = False) -> List[Dict]:
    """Train all parameters; keep the epoch with the best validation accuracy (loaded into ``model`` at the end).

    ``out_dir/last.pth`` (model, optimiser, schedule, history) is written after every epoch, so a run continues
    where it stopped with ``resume=True``; ``out_dir/model_best.pth`` holds the best weights. Returns one dict per
    epoch: ``epoch``, ``train_loss``, ``val_accuracy``, ``lr`` (at the epoch's start).
    """
    model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    last, best_path = out_dir / 'last.pth', out_dir / 'model_best.pth'
    history: List[Dict] = []
    best_accuracy = -1.
    if resume and last.is_file():
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        history, best_accuracy = state['history'], state['best_accuracy']
        print(f'resuming after epoch {len(history)} from {last}')
    for epoch in range(len(history), epochs):
        model.train(not eval_mode)
        losses, epoch_lr = [], optimizer.param_groups[0]['lr']
        for images, labels in tqdm(train_loader, desc=f'epoch {epoch + 1}/{epochs}', leave=False):
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        accuracy = _accuracy(model, val_loader, device, 'validation')
        history.append({'epoch': epoch + 1, 'train_loss': float(np.mean(losses)), 'val_accuracy': accuracy,
                        'lr': epoch_lr})
        print(f'epoch {epoch + 1}/{epochs}: train loss {history[-1]["train_loss"]:.4f}, val accuracy {accuracy:.4f}')
        if accuracy > best_accuracy:
            best_accuracy = accuracy
            save_torch(best_path, {'state_dict': model.state_dict(), 'epoch': epoch + 1})
        save_torch(last, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                          'scheduler': scheduler.state_dict(), 'history': history, 'best_accuracy': best_accuracy})
    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)['state_dict'])
    return history


def feature_distortion(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean L2 distance between matching rows of two feature matrices (N, D)."""
    return float((after - before).norm(dim=1).mean())


# ---------------------------------------------------------------------------------------------------------------
# One transfer run
# ---------------------------------------------------------------------------------------------------------------

def run_transfer(model: nn.Module, data: TransferData, mode: str, out_dir: Path, epochs: int = 10,
                 lr: Optional[float] = None, batch_size: int = 32, workers: int = 4, device: str = 'cpu',
                 eval_mode: bool = True, resume: bool = False, cs: Sequence[float] = DEFAULT_CS) -> Dict:
    """Transfer ``model`` (its current weights are the starting point) with ``mode`` in ``MODES``.

    Writes under ``out_dir``: ``linear_probe.pt`` (lp, lpft), ``last.pth`` / ``model_best.pth`` (the final model,
    loadable with ``fan.create_model(name, checkpoint=...)``, whose head has ``len(classes)`` outputs) and
    ``results.json``.
    Returns the contents of ``results.json``: accuracies, distortions, the probe's sweep and the training history.
    """
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device)
    if mode != 'lp' and epochs < 1:
        raise UserError(f'fine-tuning needs at least one epoch, got {epochs}')

    def loader(dataset: ImageFolder, shuffle: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          drop_last=shuffle and len(dataset) > batch_size)

    val_loader = loader(data.val)
    ood_loader = loader(data.ood) if data.ood is not None else None
    initial_val, _, val_labels = extract_features(model, val_loader, device, 'initial val features')
    initial_ood = extract_features(model, ood_loader, device, 'initial OOD features')[0] if ood_loader else None

    num_classes = len(data.classes)
    results: Dict = {'mode': mode, 'classes': data.classes}
    if mode in ('lp', 'lpft'):
        probe_path = out_dir / 'linear_probe.pt'
        if resume and probe_path.is_file():
            probe = LinearProbe(**torch.load(probe_path, weights_only=True))
        else:
            train_features, _, train_labels = extract_features(model, loader(data.train_eval), device, 'train features')
            probe = fit_linear_probe(train_features, train_labels, initial_val, val_labels, num_classes, cs)
            save_torch(probe_path, asdict(probe))
        set_linear_classifier(model, probe.weight, probe.bias)
        results['linear_probe'] = {'c': probe.c, 'val_accuracy': probe.val_accuracy, 'sweep': probe.sweep}
    else:
        model.reset_classifier(num_classes)
    model.to(device)

    if mode == 'lp':
        save_torch(out_dir / 'model_best.pth', {'state_dict': model.state_dict()})
    else:
        lr = DEFAULT_LR[mode] if lr is None else lr
        results.update(lr=lr, epochs=epochs, eval_mode=eval_mode)
        results['history'] = fine_tune(model, loader(data.train, shuffle=True), val_loader, epochs, lr, device,
                                       out_dir, eval_mode, resume)

    final_val, val_logits, _ = extract_features(model, val_loader, device, 'final val features')
    results['id_accuracy'] = float((val_logits.argmax(1) == val_labels).float().mean())
    results['id_distortion'] = feature_distortion(initial_val, final_val)
    if ood_loader is not None:
        final_ood, ood_logits, ood_labels = extract_features(model, ood_loader, device, 'final OOD features')
        results['ood_accuracy'] = float((ood_logits.argmax(1) == ood_labels).float().mean())
        results['ood_distortion'] = feature_distortion(initial_ood, final_ood)
    write_json(out_dir / 'results.json', results)
    return results


def _summary(results: Dict) -> str:
    parts = [f"{results['mode']}: ID accuracy {results['id_accuracy']:.4f}"]
    if 'ood_accuracy' in results:
        parts.append(f"OOD accuracy {results['ood_accuracy']:.4f}")
    parts.append(f"feature distortion ID {results['id_distortion']:.4f}")
    if 'ood_distortion' in results:
        parts.append(f"OOD {results['ood_distortion']:.4f}")
    if 'linear_probe' in results:
        parts.append(f"probe C {results['linear_probe']['c']:.3g}")
    return ', '.join(parts)


def _run_finetune(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    model = model_from_args(args)
    config = resolve_data_config(model)
    transform = create_image_transform(config)
    train_transform = create_image_transform(config, is_training=True) if args.augment else transform
    data = load_image_folders(args.data, transform, train_transform, args.ood)
    print(f'{args.model}, mode {args.mode}: {len(data.classes)} classes, {len(data.train)} train / '
          f'{len(data.val)} val' + (f' / {len(data.ood)} OOD images' if data.ood is not None else ''))
    results = run_transfer(model, data, args.mode, args.out, args.epochs, args.lr, args.batch_size,
                           args.workers, resolve_device(args.device), not args.train_mode, args.resume)
    print(_summary(results))
    print(f'results.json and model_best.pth written to {args.out}/')
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'finetune', help='linear probe (lp), fine-tuning (ft) or LP-FT on an ImageFolder dataset',
        description='Transfer a timm/FAN model to DATA/train + DATA/val (one sub-folder per class) and report ID '
                    'accuracy, OOD accuracy (--ood, same class names) and feature distortion.')
    add_model_options(parser)
    add_data_option(parser, 'dataset folder with train/ and val/ ImageFolder splits')
    parser.add_argument('--mode', required=True, choices=MODES)
    parser.add_argument('--ood', type=Path, metavar='DIR',
                        help='ImageFolder of shifted images with (some of) the same classes')
    add_out_option(parser, 'finetune-out')
    parser.add_argument('--epochs', type=positive_int, default=10, help='default: %(default)s')
    parser.add_argument('--lr', type=positive_float, help=f'learning rate (default: {DEFAULT_LR["ft"]:g} ft, '
                                                 f'{DEFAULT_LR["lpft"]:g} lpft)')
    parser.add_argument('--train-mode', action='store_true',
                        help='fine-tune in train() mode (BatchNorm statistics update, dropout on) instead of eval()')
    parser.add_argument('--no-augment', dest='augment', action='store_false',
                        help='train on the eval transform instead of timm\'s training augmentation')
    parser.add_argument('--resume', action='store_true', help='continue from the files already in --out')
    add_run_options(parser, batch_size=32, precision=False)
    parser.set_defaults(func=_run_finetune)


def _write_photo_splits(root: Path, size: int = 64) -> None:
    """ImageFolder splits cut from three bundled photos: random crops for train / val, and the same kind of
    crops in greyscale with blur as the OOD split (a colour and sharpness shift)."""
    import torchvision.transforms as T

    from fan.data import bundled_photos

    crop = T.RandomResizedCrop(size, scale=(0.1, 0.6))
    shift = T.Compose([T.Grayscale(num_output_channels=3), T.GaussianBlur(5, sigma=1.5)])
    torch.manual_seed(0)
    for photo in bundled_photos()[:3]:
        for split, count in (('train', 8), ('val', 4), ('ood', 4)):
            folder = root / split / photo.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = crop(photo.image)
                (shift(image) if split == 'ood' else image).save(folder / f'{i}.png')


def demo_lpft(out_dir: Path) -> None:
    """LP, FT and LP-FT of a random-init resnet18 on crops of three bundled photos."""
    root = out_dir / 'lpft'
    _write_photo_splits(root / 'data')
    print('resnet18 with RANDOM weights at 64 px on 3 classes of photo crops (24 train, 12 val, 12 greyscale+blur '
          'OOD). FT and LP-FT both run 3 epochs at lr 0.01, so only the starting head differs. The numbers show the '
          'pipeline runs; random features say little about pretrained models. (A random-init FAN is a poor stand-in '
          'here: its LayerNorm\'d features barely differ between images, so the probe needs huge weights.)')
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        model = create_model('resnet18')
        transform = create_image_transform(resolve_data_config(model, img_size=64))
        data = load_image_folders(str(root / 'data'), transform, transform, str(root / 'data' / 'ood'))
        rows.append(run_transfer(model, data, mode, root / mode, epochs=3, lr=0.01, batch_size=8, workers=0))
    print(f"  {'mode':<6}{'ID acc':>8}{'OOD acc':>9}{'distortion ID':>15}{'distortion OOD':>16}")
    for r in rows:
        print(f"  {r['mode']:<6}{r['id_accuracy']:>8.3f}{r['ood_accuracy']:>9.3f}{r['id_distortion']:>15.4f}"
              f"{r['ood_distortion']:>16.4f}")
    print(f'  results.json per mode under {root}/')
