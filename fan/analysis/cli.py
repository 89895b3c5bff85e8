"""``fan spectrum``: token-grouping analysis of one or more models on a set of images, and its demo step.

Writes ``spectrum.json`` (settings, images, per-model per-block results; rewritten after every model so finished
models survive an interrupted run), ``spectra.png``, ``depth.png`` and ``clusters/<NNN>_<image>.png``.
"""
import argparse
import dataclasses
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform
from tqdm import tqdm

from ..errors import UserError, require_extra
from ..factory import create_image_transform, create_model, resolve_data_config
from ..io import image_files, read_images, write_json
from ..options import (add_data_option, add_model_options, add_out_option, add_run_options, non_negative_float,
                       non_negative_int, positive_int, probability, uses_fast_modules)
from .report import AnalysisSettings, ModelReport, analyse_model

__all__ = ['image_files', 'load_images', 'create_analysis_model', 'run_spectrum', 'add_commands', 'demo_spectrum']

NamedImage = Tuple[str, Image.Image]
ModelSpec = Tuple[str, Optional[Path]]  # timm model name, checkpoint file or None


def load_images(files: Sequence[Path]) -> List[NamedImage]:
    """(file name, RGB image) pairs of the readable files; unreadable ones are skipped and named on stderr."""
    return [(str(file), image) for file, image in read_images(files, 'spectrum')]


def create_analysis_model(
        name: str,
        checkpoint: Optional[Path] = None,
        pretrained: bool = False,
        use_ema: bool = False,
        optimize: bool = False,
) -> Tuple[nn.Module, str]:
    """A timm (or FAN) model in eval mode (built with :func:`fan.create_model`, with its CPU fast modules if
    ``optimize``) and a description of its weights."""
    model = create_model(name, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint,
                         use_ema=use_ema, optimize=optimize)
    if not hasattr(model, 'forward_intermediates'):
        raise UserError(f'{name} has no forward_intermediates(), so its blocks cannot be analysed')
    if checkpoint is not None:
        weights = f'checkpoint {checkpoint}' + (' (EMA)' if use_ema else '')
    else:
        weights = 'pretrained' if pretrained else 'random init'
    return model.eval(), weights


def _parse_model_spec(spec: str) -> ModelSpec:
    """'NAME' or 'NAME=CHECKPOINT'."""
    name, _, checkpoint = spec.partition('=')
    return name, Path(checkpoint) if checkpoint else None


def _batches(model: nn.Module, images: Sequence[NamedImage], batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised (B, 3, H, W) batches made with the model's eval transform."""
    transform = create_image_transform(resolve_data_config(model))
    for start in range(0, len(images), batch_size):
        yield torch.stack([transform(image) for _, image in images[start:start + batch_size]])


def _write_json(
        path: Path,
        settings: AnalysisSettings,
        images: Sequence[NamedImage],
        reports: Sequence[ModelReport],
) -> None:
    """Write spectrum.json through a temporary file, so an interruption never leaves a truncated file."""
    result = dict(
        settings=dataclasses.asdict(settings),
        notes=dict(
            features='patch tokens after each block from forward_intermediates (no class token); larger maps '
                     'average-pooled to at most max_tokens tokens',
            affinity='S = Z Z^T (center: mean token removed; cosine: unit-norm tokens); spectrum = eigenvalues '
                     'of S, descending, spectrum_* lists are image means of lambda_i / lambda_max',
            significant='count of eigenvalues >= rel_threshold * lambda_max',
            clusters='eigengap of the normalised Laplacian of max(cosine affinity, 0); maps by k-means on its '
                     'first num_clusters eigenvectors',
            noise='N(0, sigma^2) added in [0,1] pixel space before normalisation, not clipped; noise_ratio = '
                  '||Z(x+n) - Z(x)||_F / ||Z(x)||_F averaged over num_draws; *_noisy use the first draw',
        ),
        images=[name for name, _ in images],
        models=[dataclasses.asdict(report) for report in reports],
    )
    write_json(path, result, indent=None)


def _print_report(report: ModelReport, num_images: int) -> None:
    print(f'{report.model} ({report.weights}), {num_images} images at {"x".join(map(str, report.input_size))}')
    print('block  tokens  channels  signif.clean  signif.noisy  clusters  eff.rank  noise ratio')
    for block in report.blocks:
        print(f'{block.index:5d}  {block.grid[0]:>3d}x{block.grid[1]:<3d}  {block.channels:8d}  '
              f'{np.mean(block.significant_clean):12.1f}  {np.mean(block.significant_noisy):12.1f}  '
              f'{np.mean(block.num_clusters_clean):8.2f}  {np.mean(block.effective_rank_clean):8.1f}  '
              f'{np.mean(block.noise_ratio):11.4f}')


def run_spectrum(
        model_specs: Sequence[ModelSpec],
        images: Sequence[NamedImage],
        out_dir: Path,
        settings: AnalysisSettings,
        pretrained: bool = False,
        batch_size: int = 8,
        use_ema: bool = False,
        optimize: bool = False,
) -> List[ModelReport]:
    """Analyse every model on ``images`` and write spectrum.json and the figures under ``out_dir``."""
    require_extra('matplotlib', 'analysis')
    require_extra('sklearn', 'analysis')
    from .plots import plot_cluster_maps, plot_depth_curves, plot_spectra

    if not images:
        raise UserError('no images given')
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    view_transforms = []  # per model: the image as the model sees it (resized and cropped, not normalised)
    for name, checkpoint in model_specs:
        model, weights = create_analysis_model(name, checkpoint, pretrained, use_ema, optimize)
        batches = tqdm(_batches(model, images, batch_size), desc=name, total=-(-len(images) // batch_size),
                       leave=False)
        try:
            report = analyse_model(model, batches, settings, name, weights)
        except UserError as err:  # e.g. a cluster block out of range for this model
            raise UserError(f'{name}: {err}') from None
        reports.append(report)
        view_transforms.append(create_transform(**resolve_data_config(model), normalize=False))
        _write_json(out_dir / 'spectrum.json', settings, images, reports)
        _print_report(report, len(images))
    if any(report.weights == 'random init' for report in reports):
        print('note: models with random init weights show that the pipeline works; their numbers say nothing '
              'about trained networks')

    plot_spectra(reports, settings, out_dir / 'spectra.png')
    plot_depth_curves(reports, settings, out_dir / 'depth.png')
    (out_dir / 'clusters').mkdir(exist_ok=True)
    for index, (name, image) in enumerate(images):
        views = [transform(image).permute(1, 2, 0).numpy() for transform in view_transforms]
        title = f'{Path(name).name}: {settings.num_clusters} spectral clusters'
        plot_cluster_maps(reports, views, index, settings.num_clusters, title,
                          out_dir / 'clusters' / f'{index:03d}_{Path(name).stem}.png')
    print(f'wrote {out_dir}/spectrum.json, spectra.png, depth.png and {len(images)} figures in clusters/')
    return reports


def _settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    if args.sigma < 0:
        raise UserError(f'--sigma must be >= 0, got {args.sigma}')
    if args.draws < 1:
        raise UserError(f'--draws must be >= 1, got {args.draws}')
    if not 0 < args.threshold < 1:
        raise UserError(f'--threshold must be in (0, 1), got {args.threshold}')
    if args.max_k < 1:
        raise UserError(f'--max-k must be >= 1, got {args.max_k}')
    if not 1 <= args.clusters <= 20:
        raise UserError(f'--clusters must be in [1, 20], got {args.clusters}')
    if args.max_tokens and args.max_tokens < max(args.clusters, 2):
        raise UserError(f'--max-tokens must be at least --clusters and 2, got {args.max_tokens}')
    return AnalysisSettings(
        sigma=args.sigma, num_draws=args.draws, rel_threshold=args.threshold, max_k=args.max_k, center=args.center,
        cosine=args.cosine, max_tokens=args.max_tokens or None, num_clusters=args.clusters,
        cluster_blocks=tuple(args.cluster_blocks) if args.cluster_blocks else None, seed=args.seed,
    )


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f'--batch-size must be >= 1, got {args.batch_size}')
    settings = _settings_from_args(args)
    specs = [(args.model, args.checkpoint)] + [_parse_model_spec(spec) for spec in args.compare]
    images = load_images(image_files(args.data))
    run_spectrum(specs, images, args.out, settings, pretrained=args.pretrained, batch_size=args.batch_size,
                 use_ema=args.ema, optimize=uses_fast_modules(args))
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'spectrum', help='token-grouping analysis: affinity spectra, clusters and noise per block',
        description='Per block of each model: eigenvalue spectrum of the token affinity S = Z Z^T, '
                    'significant-eigenvalue count, eigengap cluster count and spectral-cluster maps, for clean '
                    'and Gaussian-noise input, plus the relative feature change caused by the noise.')
    add_model_options(parser, num_classes=False, img_size=False)
    parser.add_argument('--compare', nargs='+', default=[], metavar='NAME[=CHECKPOINT]',
                        help='more models drawn in the same figures')
    add_data_option(parser, 'image files and/or folders (searched recursively)', nargs='+')
    add_out_option(parser, 'spectrum-out')
    parser.add_argument('--sigma', type=non_negative_float, default=0.1,
                        help='input noise std in [0,1] pixel units (default %(default)s)')
    parser.add_argument('--draws', type=positive_int, default=4, help='noise draws per image (default %(default)s)')
    parser.add_argument('--threshold', type=probability, default=1e-2,
                        help='significant eigenvalue: >= THRESHOLD * lambda_max (default %(default)s)')
    parser.add_argument('--max-k', type=positive_int, default=10,
                        help='largest eigengap cluster count (default %(default)s)')
    parser.add_argument('--center', action='store_true', help='subtract the mean token before the affinities')
    parser.add_argument('--cosine', action='store_true', help='cosine affinity (unit-norm tokens) for the spectrum')
    parser.add_argument('--max-tokens', type=non_negative_int, default=196,
                        help='average-pool larger maps to at most this many tokens; 0 keeps all (default %(default)s)')
    parser.add_argument('--clusters', type=positive_int, default=2,
                        help='clusters in the cluster maps (default %(default)s)')
    parser.add_argument('--cluster-blocks', type=int, nargs='+', metavar='INDEX',
                        help='blocks with cluster maps, negative counts from the end (default: 4 evenly spaced)')
    add_run_options(parser, batch_size=8, workers=False, precision=False, device=False)
    parser.set_defaults(func=_run)


def demo_spectrum(out_dir: Path) -> None:
    """``fan spectrum`` on the bundled photos with random-init FAN-T (when registered), DeiT-T and ResNet-18."""
    from fan.data import bundled_photos
    names = [name for name in ('fan_tiny_12_p16_224', 'deit_tiny_patch16_224', 'resnet18') if timm.is_model(name)]
    images = [(photo.name, photo.image) for photo in bundled_photos()]
    print(f'models with RANDOM weights (no download here): {", ".join(names)}; {len(images)} bundled photos.\n'
          'The numbers are not the paper\'s: this step shows that the analysis runs end to end.')
    run_spectrum([(name, None) for name in names], images, out_dir / 'spectrum', AnalysisSettings(num_draws=2))
