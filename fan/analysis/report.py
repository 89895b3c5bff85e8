"""The token-grouping protocol run on one model and a set of images, summarised per block for ``spectrum.json``.

Per block l and image: the affinity spectrum, significant-eigenvalue count, effective rank and eigengap cluster
count of the clean tokens and of one noisy draw; the noise ratio ``||Z_l(x + n) - Z_l(x)|| / ||Z_l(x)||``
averaged over draws; spectral-cluster label maps for the chosen blocks.
"""
from dataclasses import dataclass, fields
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .blocks import block_feature_maps, map_to_tokens, noisy_block_feature_maps, pool_to_max_tokens, relative_change
from .spectrum import TokenSpectrum, spectral_clusters, token_spectrum
from ..errors import UserError

__all__ = ['AnalysisSettings', 'BlockReport', 'ModelReport', 'analyse_model', 'default_cluster_blocks']


@dataclass(frozen=True)
class AnalysisSettings:
    """Protocol parameters (all written to spectrum.json)."""
    sigma: float = 0.1  # std of the Gaussian input noise in [0, 1] pixel space
    num_draws: int = 4  # noise draws per image for the noise ratio
    rel_threshold: float = 1e-2  # eigenvalue counts as significant when >= rel_threshold * lambda_max
    max_k: int = 10  # largest cluster count of the eigengap estimate
    center: bool = False  # subtract the mean token before the affinities
    cosine: bool = False  # cosine (unit-norm token) affinity for the spectrum
    max_tokens: Optional[int] = 196  # larger maps are average-pooled to at most this many tokens
    num_clusters: int = 2  # k of the cluster maps (the paper's masks use 2)
    cluster_blocks: Optional[Tuple[int, ...]] = None  # blocks with cluster maps; None: 4 evenly spaced
    seed: int = 0  # noise generator and k-means seed


@dataclass
class BlockReport:
    """Results of one block; per-image lists follow the order of the images."""
    index: int
    grid: Tuple[int, int]  # token grid (h, w) after pooling; N = h * w
    channels: int
    spectrum_clean: List[float]  # mean over images of lambda_i / lambda_max, descending, length N
    spectrum_noisy: List[float]  # the same for the first noise draw
    significant_clean: List[int]  # significant-eigenvalue count per image
    significant_noisy: List[int]
    effective_rank_clean: List[float]
    num_clusters_clean: List[int]  # eigengap estimate per image
    num_clusters_noisy: List[int]
    noise_ratio: List[float]  # per image, mean over draws
    cluster_maps: Optional[List[List[List[int]]]]  # per image an (h, w) label grid; chosen blocks only, else None


@dataclass
class ModelReport:
    model: str
    weights: str  # 'random init', 'timm pretrained' or 'checkpoint <file>'
    input_size: Tuple[int, int, int]
    blocks: List[BlockReport]


def default_cluster_blocks(num_blocks: int, count: int = 4) -> Tuple[int, ...]:
    """``count`` evenly spaced block indices from the first to the last block."""
    return tuple(sorted({int(round(i)) for i in np.linspace(0, num_blocks - 1, count)}))


def _resolve_cluster_blocks(requested: Optional[Sequence[int]], num_blocks: int) -> Tuple[int, ...]:
    if requested is None:
        return default_cluster_blocks(num_blocks)
    for index in requested:
        if not -num_blocks <= index < num_blocks:
            raise UserError(f'cluster block {index} out of range for a model with {num_blocks} blocks')
    return tuple(sorted({index % num_blocks for index in requested}))


def _concat(spectra: Sequence[TokenSpectrum]) -> TokenSpectrum:
    """Join per-batch spectra of one block along the batch dimension."""
    return TokenSpectrum(**{
        f.name: torch.cat([getattr(spectrum, f.name) for spectrum in spectra]) for f in fields(TokenSpectrum)})


def _mean_normalised_spectrum(eigenvalues: torch.Tensor) -> List[float]:
    """Mean over images of eigenvalues / lambda_max: (num_images, N) -> N floats."""
    eigenvalues = eigenvalues.double()
    return (eigenvalues / eigenvalues[:, :1].clamp_min(1e-300)).mean(dim=0).tolist()


@torch.no_grad()
def analyse_model(
        model: nn.Module,
        batches: Iterable[torch.Tensor],
        settings: AnalysisSettings,
        name: str,
        weights: str,
) -> ModelReport:
    """Run the protocol on image batches (B, 3, H, W), each normalised with the model's data config.

    The noise generator is seeded with ``settings.seed`` once per model, so models with the same input size see
    the same noise.
    """
    generator = torch.Generator().manual_seed(settings.seed)

    def spectra(maps: Sequence[torch.Tensor]) -> List[TokenSpectrum]:
        return [
            token_spectrum(
                map_to_tokens(pool_to_max_tokens(feature_map, settings.max_tokens)),
                rel_threshold=settings.rel_threshold, max_k=settings.max_k,
                center=settings.center, cosine=settings.cosine,
            )
            for feature_map in maps
        ]

    clean_spectra, noisy_spectra, noise_ratios, cluster_maps = [], [], [], []  # one entry per batch
    for batch in batches:
        clean_maps = block_feature_maps(model, batch)
        pooled_maps = [pool_to_max_tokens(feature_map, settings.max_tokens) for feature_map in clean_maps]
        cluster_blocks = _resolve_cluster_blocks(settings.cluster_blocks, len(clean_maps))
        clean_spectra.append(spectra(clean_maps))
        ratio_sum = torch.zeros(batch.shape[0], len(clean_maps))
        draws = noisy_block_feature_maps(model, batch, settings.sigma, settings.num_draws, generator)
        for draw, noisy_maps in enumerate(draws):
            ratio_sum += relative_change(clean_maps, noisy_maps).cpu()
            if draw == 0:
                noisy_spectra.append(spectra(noisy_maps))
        noise_ratios.append(ratio_sum / settings.num_draws)
        cluster_maps.append({
            index: spectral_clusters(
                map_to_tokens(pooled_maps[index]), settings.num_clusters, center=settings.center, seed=settings.seed,
            ).view(-1, *pooled_maps[index].shape[-2:])
            for index in cluster_blocks
        })

    if not noise_ratios:
        raise UserError('no images to analyse')
    noise_ratio = torch.cat(noise_ratios)  # (num_images, num_blocks)
    blocks = []
    for index, feature_map in enumerate(clean_maps):
        clean = _concat([batch_spectra[index] for batch_spectra in clean_spectra])
        noisy = _concat([batch_spectra[index] for batch_spectra in noisy_spectra])
        blocks.append(BlockReport(
            index=index,
            grid=tuple(pooled_maps[index].shape[-2:]),
            channels=feature_map.shape[1],
            spectrum_clean=_mean_normalised_spectrum(clean.eigenvalues),
            spectrum_noisy=_mean_normalised_spectrum(noisy.eigenvalues),
            significant_clean=clean.significant.tolist(),
            significant_noisy=noisy.significant.tolist(),
            effective_rank_clean=clean.effective_rank.tolist(),
            num_clusters_clean=clean.num_clusters.tolist(),
            num_clusters_noisy=noisy.num_clusters.tolist(),
            noise_ratio=noise_ratio[:, index].tolist(),
            cluster_maps=(torch.cat([maps[index] for maps in cluster_maps]).tolist()
                          if index in cluster_blocks else None),
        ))
    return ModelReport(model=name, weights=weights, input_size=tuple(batch.shape[1:]), blocks=blocks)
