"""Out-of-distribution detection with activation shaping (ASH) and logit scores.

ASH (Djurisic et al., ICLR 2023, arXiv 2209.09858) prunes a sample's activations to its ``k`` largest values and
reshapes what is left before the classifier; an OOD score (energy, MSP, max logit) of the shaped logits then
separates in-distribution (ID) from OOD inputs. ``AshDetector`` applies a shaping to any timm model's pre-logits
(``model.forward_head(model.forward_features(x), pre_logits=True)``) or to the output of any named sub-module, and
scores the result through ``model.get_classifier()``.

Conventions, stated once for the whole module:
* ``percentile`` is 0-100 (as in the ASH paper and OpenOOD; pytorch-ood uses a fraction). Per sample the
  ``n`` activations are flattened and ``k = n - round(n * percentile / 100)`` (round half to even) of the
  largest *signed* values are kept; exactly ``k`` survive, even with ties.
* The shaping functions never modify their input (the reference code prunes the caller's tensor in place).
* Every score is *higher = more in-distribution*. ``energy`` returns ``T * logsumexp(logits / T)``, i.e. the
  negative of Liu et al.'s energy.
* ``ood_metrics`` treats ID as the positive class. ``fpr95`` is the share of OOD samples accepted at the threshold
  that keeps 95 % of ID samples (the ASH / ReAct convention). OpenOOD since v1.5 and pytorch-ood make OOD the
  positive class and report the share of ID samples rejected at 95 % OOD recall instead, a different number.
  AUROC is the same under both conventions.
"""
import argparse
import difflib
import io
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .errors import UserError, require_extra
from .factory import create_image_transform, create_model, resolve_data_config
from .io import find_images, read_image, readable_images, write_atomic, write_json
from .options import (add_data_option, add_model_options, add_out_option, add_run_options, autocast, model_from_args,
                      percentage, resolve_device)

__all__ = [
    'ash_p', 'ash_b', 'ash_s', 'ash_rand', 'scale', 'SHAPINGS', 'energy', 'msp', 'max_logit', 'SCORES',
    'keep_count', 'AshDetector', 'score_images', 'ood_metrics', 'ImageFiles',
]


# ---------------------------------------------------------------------------------------------------------------
# Activation shaping. Every function takes activations x of shape (B, ...) -- typically (B, C) pre-logits or a
# (B, C, H, W) map -- and returns a new tensor of the same shape; the top-k runs over each sample's flattened
# activations (C * H * W values for a map).
# ---------------------------------------------------------------------------------------------------------------

def keep_count(num_activations: int, percentile: float) -> int:
    """Number k of activations ASH keeps per sample: ``n - round(n * percentile / 100)``."""
    if not 0 <= percentile <= 100:
        raise UserError(f'percentile must be within 0-100 (ASH convention), got {percentile}')
    k = num_activations - round(num_activations * percentile / 100)
    if k < 1:
        raise UserError(f'percentile {percentile} keeps no activation out of {num_activations}; use a lower one')
    return k


def _top_k(x: torch.Tensor, percentile: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened activations (B, n) and the values and indices (B, k) of each sample's k largest entries."""
    if x.ndim < 2:
        raise UserError(f'activations need a batch dimension: expected (B, C) or (B, C, H, W), got {tuple(x.shape)}')
    flat = x.reshape(x.shape[0], -1)  # may be a view of x: only read from it
    values, indices = flat.topk(keep_count(flat.shape[1], percentile), dim=1)
    return flat, values, indices


def ash_p(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-P: keep each sample's k largest activations, set the rest to zero."""
    flat, values, indices = _top_k(x, percentile)
    return torch.zeros_like(flat).scatter(1, indices, values).reshape(x.shape)


def ash_b(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-B: write s1 / k into each of the k top slots (zero elsewhere); s1 = sum of all the sample's activations."""
    flat, values, indices = _top_k(x, percentile)
    fill = flat.sum(dim=1, keepdim=True) / values.shape[1]
    return torch.zeros_like(flat).scatter(1, indices, fill.expand_as(values)).reshape(x.shape)


def ash_s(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-S: prune as ASH-P, then scale by exp(s1 / s2), s1 / s2 = sum of all / of the kept activations."""
    flat, values, indices = _top_k(x, percentile)
    factor = torch.exp(flat.sum(dim=1, keepdim=True) / values.sum(dim=1, keepdim=True))
    return (torch.zeros_like(flat).scatter(1, indices, values) * factor).reshape(x.shape)


def ash_rand(x: torch.Tensor, percentile: float, low: float = 0., high: float = 10.,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ASH-RAND: zero all but the k top slots, which get independent Uniform(low, high) noise."""
    flat, values, indices = _top_k(x, percentile)
    noise = torch.empty_like(values).uniform_(low, high, generator=generator)
    return torch.zeros_like(flat).scatter(1, indices, noise).reshape(x.shape)


def scale(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """SCALE (Xu et al., ICLR 2024): multiply the *unpruned* activations by ASH-S's exp(s1 / s2)."""
    flat, values, _ = _top_k(x, percentile)
    factor = torch.exp(flat.sum(dim=1, keepdim=True) / values.sum(dim=1, keepdim=True))
    return (flat * factor).reshape(x.shape)


def _no_shaping(x: torch.Tensor, percentile: float) -> torch.Tensor:
    return x


Shaping = Callable[[torch.Tensor, float], torch.Tensor]
SHAPINGS: Dict[str, Shaping] = {
    'none': _no_shaping, 'ash_p': ash_p, 'ash_b': ash_b, 'ash_s': ash_s, 'ash_rand': ash_rand, 'scale': scale,
}


# ---------------------------------------------------------------------------------------------------------------
# Scores: logits (B, num_classes) -> (B,), higher = more in-distribution.
# ---------------------------------------------------------------------------------------------------------------

def energy(logits: torch.Tensor, temperature: float = 1.) -> torch.Tensor:
    """Negative energy ``T * logsumexp(logits / T)`` (higher = ID)."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability."""
    return logits.softmax(dim=-1).amax(dim=-1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Largest logit."""
    return logits.amax(dim=-1)


SCORES: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {'energy': energy, 'msp': msp, 'max_logit': max_logit}


class AshDetector(nn.Module):
    """OOD detector: shape a model's activations, score its logits (higher = in-distribution).

    By default the shaping acts on the pre-logits (B, D) between ``forward_head(..., pre_logits=True)`` and
    ``get_classifier()``, which is where the ASH paper applies it (after global pooling) and, for FAN, the
    LayerNorm'd class token. ``layer`` names a sub-module (as in ``model.named_modules()``) whose output is shaped
    instead, e.g. ``'cls_attn_blocks.1.mlp.act'`` for the GELU hidden activation of FAN's last class-attention
    block. ``rectify`` clips the activations at zero before shaping, which ASH assumes (post-ReLU features).

    Args:
        model: a timm-style classifier; it is put in eval mode and not modified.
        shaping: a key of ``SHAPINGS`` ('none', 'ash_p', 'ash_b', 'ash_s', 'ash_rand', 'scale').
        percentile: 0-100, share of activations pruned per sample.
        score: a key of ``SCORES`` ('energy', 'msp', 'max_logit').
        rectify: apply ``clamp(min=0)`` before the shaping.
        layer: name of the sub-module whose output to shape; None for the pre-logits.
    """

    def __init__(self, model: nn.Module, shaping: str = 'ash_s', percentile: float = 90., score: str = 'energy',
                 rectify: bool = False, layer: Optional[str] = None):
        super().__init__()
        if shaping not in SHAPINGS:
            raise UserError(f"unknown shaping '{shaping}'; choose from {', '.join(SHAPINGS)}")
        if score not in SCORES:
            raise UserError(f"unknown score '{score}'; choose from {', '.join(SCORES)}")
        if shaping != 'none':
            keep_count(100, percentile)  # fail early on an out-of-range percentile
        self.model = model.eval()
        self.shaping, self.percentile, self.score, self.rectify, self.layer = shaping, percentile, score, rectify, layer
        if layer is None:
            classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
            if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
                raise UserError(f'{type(model).__name__} has no single classifier module (get_classifier() returned '
                                 f'{type(classifier).__name__}); pass layer= to shape a sub-module instead')
            self.classifier = classifier
        else:
            modules = dict(model.named_modules())
            if layer not in modules:
                close = difflib.get_close_matches(layer, modules, n=5)
                hint = f"; close names: {', '.join(close)}" if close else ''
                raise UserError(f"model has no sub-module '{layer}'{hint}")
            self.hooked = modules[layer]

    def shape(self, activations: torch.Tensor) -> torch.Tensor:
        """Rectify (if asked) and shape activations (B, ...) into a new tensor of the same shape."""
        if self.rectify:
            activations = activations.clamp(min=0)
        return SHAPINGS[self.shaping](activations, self.percentile)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Shaped logits (B, num_classes) for normalised images (B, 3, H, W)."""
        if self.layer is None:
            features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            return self.classifier(self.shape(features))
        handle = self.hooked.register_forward_hook(lambda module, inputs, output: self.shape(output))
        try:
            return self.model(images)
        finally:
            handle.remove()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """OOD scores (B,) for normalised images (B, 3, H, W); higher = more in-distribution."""
        return SCORES[self.score](self.logits(images))


@torch.no_grad()
def score_images(detector: AshDetector, loader: DataLoader, device: torch.device, desc: str = 'scoring') -> np.ndarray:
    """Scores (N,) of every image a loader yields; batches are ``images`` or ``(images, ...)``."""
    detector.eval().to(device)
    scores = []
    for batch in tqdm(loader, desc=desc, leave=False):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        scores.append(detector(images.to(device)).float().cpu())
    return torch.cat(scores).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

def _as_scores(values, name: str) -> np.ndarray:
    scores = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    scores = scores.reshape(-1)
    if scores.size == 0:
        raise UserError(f'{name} is empty')
    if not np.isfinite(scores).all():
        raise UserError(f'{name} contains {np.count_nonzero(~np.isfinite(scores))} NaN/inf values (ASH-S and SCALE '
                         'overflow on signed features whose kept sum is near zero: try rectify / --rectify)')
    return scores


def ood_metrics(id_scores, ood_scores) -> Dict[str, float]:
    """Detection metrics, all fractions in [0, 1], with ID as the positive class and higher score = more ID.

    Args:
        id_scores: scores (N_id,) of in-distribution samples (array-like or tensor).
        ood_scores: scores (N_ood,) of out-of-distribution samples.

    Returns:
        ``auroc``: probability that a random ID sample scores above a random OOD one (ties count half).
        ``aupr_in``: average precision with ID positive, ranked by score.
        ``aupr_out``: average precision with OOD positive, ranked by negated score.
        ``fpr95``: share of OOD samples scoring at or above the threshold that keeps 95 % of the ID samples.
    """
    metrics = require_extra('sklearn.metrics', 'analysis')
    id_scores, ood_scores = _as_scores(id_scores, 'id_scores'), _as_scores(ood_scores, 'ood_scores')
    is_id = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    scores = np.concatenate([id_scores, ood_scores])
    fpr, tpr, _ = metrics.roc_curve(is_id, scores, drop_intermediate=False)
    return {
        'auroc': float(metrics.roc_auc_score(is_id, scores)),
        'aupr_in': float(metrics.average_precision_score(is_id, scores)),
        'aupr_out': float(metrics.average_precision_score(1 - is_id, -scores)),
        'fpr95': float(fpr[np.searchsorted(tpr, 0.95, side='left')]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Models and images
# ---------------------------------------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Every image file under a folder (recursively, sorted), without labels; items are transformed images."""

    def __init__(self, root: str, transform: Callable):
        self.root = Path(root)
        self.files = readable_images(find_images(root), 'ood')
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image(self.files[index]))


# ---------------------------------------------------------------------------------------------------------------
# CLI and demo
# ---------------------------------------------------------------------------------------------------------------

def shaping_label(shaping: str, percentile: float, rectify: bool) -> str:
    """Short name of a shaping setting, e.g. 'ash_s@90' or 'relu+ash_b@65'."""
    return ('relu+' if rectify else '') + (shaping if shaping == 'none' else f'{shaping}@{percentile:g}')


def _format_table(rows: List[Tuple[str, str, Dict[str, float]]]) -> str:
    lines = [f"{'shaping':<22}{'OOD set':<24}{'AUROC':>8}{'AUPR-In':>9}{'AUPR-Out':>10}{'FPR95':>8}"]
    for shaping, ood_name, m in rows:
        lines.append(f"{shaping:<22}{ood_name:<24}{m['auroc']:>8.4f}{m['aupr_in']:>9.4f}{m['aupr_out']:>10.4f}"
                     f"{m['fpr95']:>8.4f}")
    return '\n'.join(lines)


def _run_ood(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model = model_from_args(args, device)
    transform = create_image_transform(resolve_data_config(model))
    names = [Path(folder).name for folder in args.ood]
    if len(set(names)) < len(names) or 'ID' in names:  # keep the report unambiguous
        names = [str(folder) for folder in args.ood]
    sets = {'ID': args.data, **dict(zip(names, args.ood))}
    loaders = {name: DataLoader(ImageFiles(folder, transform), batch_size=args.batch_size, num_workers=args.workers)
               for name, folder in sets.items()}
    out = Path(args.out)
    results, rows = [], []
    for shaping in args.shaping:
        label = shaping_label(shaping, args.percentile, args.rectify)
        detector = AshDetector(model, shaping, args.percentile, args.score, args.rectify, args.layer)
        with autocast(args.precision, device)():
            scores = {name: score_images(detector, loader, device, f'{label} {name}')
                      for name, loader in loaders.items()}
        per_set = {name: ood_metrics(scores['ID'], scores[name]) for name in scores if name != 'ID'}
        mean = {key: float(np.mean([m[key] for m in per_set.values()])) for key in next(iter(per_set.values()))}
        rows += [(label, name, m) for name, m in per_set.items()]
        if len(per_set) > 1:
            rows.append((label, 'mean', mean))
        results.append({'shaping': shaping, 'percentile': args.percentile, 'rectify': args.rectify,
                        'layer': args.layer, 'score': args.score, 'metrics': per_set, 'mean': mean})
        # written after every shaping so that a long run keeps what it finished
        encoded = io.BytesIO()
        np.savez(encoded, **scores)
        write_atomic(out / f'scores_{label}.npz', encoded.getvalue())
        write_json(out / 'metrics.json', {'model': args.model, 'results': results})
    print(f'{args.model}: score = {args.score} (higher = in-distribution), ID positive; '
          f'FPR95 = share of OOD accepted at 95 % ID recall')
    print(_format_table(rows))
    print(f'scores and metrics.json written to {out}/')
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'ood', help='OOD detection with ASH activation shaping on a timm/FAN model',
        description='Score ID and OOD image folders with a (shaped) model and report AUROC, AUPR-In, AUPR-Out and '
                    'FPR95 (fractions; ID is the positive class, higher score = more in-distribution).')
    add_model_options(parser)
    add_data_option(parser, 'folder of in-distribution images (searched recursively)')
    parser.add_argument('--ood', required=True, type=Path, action='append', metavar='DIR',
                        help='folder of OOD images; repeat for several sets')
    parser.add_argument('--shaping', nargs='+', default=['ash_s'], choices=list(SHAPINGS),
                        help='one or more shapings to compare (default: %(default)s)')
    parser.add_argument('--percentile', type=percentage, default=90., help='0-100, share pruned (default: %(default)s)')
    parser.add_argument('--score', default='energy', choices=list(SCORES), help='default: %(default)s')
    parser.add_argument('--rectify', action='store_true', help='clip activations at 0 before shaping')
    parser.add_argument('--layer', help='shape this sub-module\'s output instead of the pre-logits')
    add_out_option(parser, 'ood-out')
    add_run_options(parser, seed=None)
    parser.set_defaults(func=_run_ood)


def _synthetic_ood_images(count: int, size: int, seed: int = 0) -> Dict[str, List[Image.Image]]:
    """Uniform noise and sinusoidal stripe textures, the usual far-OOD stand-ins."""
    rng = np.random.default_rng(seed)
    noise = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = []
    for _ in range(count):
        angle, freq, colour = rng.uniform(0, np.pi), rng.uniform(4, 20), rng.uniform(0, 255, 3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        stripes.append(Image.fromarray((wave[..., None] * colour).astype(np.uint8)))
    return {'noise': noise, 'stripes': stripes}


def demo_ash_scores(out_dir: Path) -> None:
    """ASH OOD scores of the bundled photos against noise / stripe images, with a random-init model."""
    from matplotlib.figure import Figure

    from fan.data import bundled_photos

    name = 'fan_tiny_12_p16_224' if timm.is_model('fan_tiny_12_p16_224') else 'resnet18'
    torch.manual_seed(0)
    model = create_model(name).eval()
    transform = create_image_transform(resolve_data_config(model))
    photos = bundled_photos()
    sets = {'photos (ID)': [p.image for p in photos], **_synthetic_ood_images(len(photos), 224)}
    images = {key: torch.stack([transform(image) for image in value]) for key, value in sets.items()}
    print(f'{name} with RANDOM weights (no download here): the numbers below only show that the pipeline runs, '
          'they say nothing about the method.')
    fig = Figure(figsize=(12, 3.2))
    axes = fig.subplots(1, 3)
    with torch.no_grad():
        for ax, (shaping, rectify) in zip(axes, [('none', False), ('ash_s', False), ('ash_s', True)]):
            detector = AshDetector(model, shaping, 90., 'energy', rectify)
            scores = {key: detector(value).numpy() for key, value in images.items()}
            label = shaping_label(shaping, 90, rectify)
            for ood in ('noise', 'stripes'):
                try:
                    m = ood_metrics(scores['photos (ID)'], scores[ood])
                    print(f'  energy, {label:<14} photos vs {ood:<8} AUROC {m["auroc"]:.3f}  FPR95 {m["fpr95"]:.3f}')
                except ValueError as error:
                    print(f'  energy, {label:<14} photos vs {ood:<8} {error}')
            for key, value in scores.items():
                finite = value[np.isfinite(value)]
                ax.plot(finite, np.full_like(finite, list(scores).index(key)), 'o', label=key)
            ax.set_yticks(range(len(scores)), list(scores))
            ax.set_title(f'energy, {label}')
            ax.set_xlabel('score (higher = ID)')
    fig.suptitle(f'{name}, random weights: pipeline check only')
    fig.tight_layout()
    fig.savefig(out_dir / 'ood_ash_scores.png', dpi=100)
    print(f'  plot: {out_dir / "ood_ash_scores.png"}')
