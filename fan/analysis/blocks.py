"""Per-block token features of any timm model (FAN, ViT/DeiT, XCiT, Swin, ConvNeXt, ResNet) and their analysis.

Features come from ``model.forward_intermediates(x, intermediates_only=True)``: one NCHW map per block (ViT-style
models: patch tokens after each block, no class token; hierarchical models: the output of each stage). A map
(B, C, H, W) becomes tokens (B, H*W, C).
"""
import inspect
import math
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_model_data_config

from ..layers import map_to_tokens
from .spectrum import TokenSpectrum, token_spectrum

__all__ = [
    'block_feature_maps', 'pool_to_max_tokens', 'map_to_tokens', 'block_spectra', 'add_pixel_noise',
    'noisy_block_feature_maps', 'relative_change', 'noise_sensitivity',
]


def _check_eval_mode(model: nn.Module) -> None:
    if model.training:
        raise ValueError('the model is in training mode (dropout/drop-path would add noise): call model.eval() first')


@torch.no_grad()
def block_feature_maps(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Output feature map of every block.

    Args:
        model: a timm model with ``forward_intermediates``, in eval mode.
        x: (B, 3, H, W) normalised input batch.

    Returns:
        One (B, C_l, H_l, W_l) map per block, in depth order.
    """
    _check_eval_mode(model)
    if not hasattr(model, 'forward_intermediates'):
        raise TypeError(
            f'{type(model).__name__} has no forward_intermediates(); use a timm (>= 1.0.3) or FAN model')
    kwargs = dict(indices=None, intermediates_only=True)
    if 'output_fmt' in inspect.signature(model.forward_intermediates).parameters:
        kwargs['output_fmt'] = 'NCHW'
    maps = model.forward_intermediates(x, **kwargs)
    for index, feature_map in enumerate(maps):
        if feature_map.ndim != 4:
            raise ValueError(f'block {index} gave a map of shape {tuple(feature_map.shape)}, expected (B, C, H, W)')
    return list(maps)


def pool_to_max_tokens(feature_map: torch.Tensor, max_tokens: Optional[int]) -> torch.Tensor:
    """Average-pool a (B, C, H, W) map by the smallest integer factor that leaves at most ``max_tokens`` positions.

    Maps that are already small enough (and every map when ``max_tokens`` is None) are returned unchanged.
    """
    height, width = feature_map.shape[-2:]
    if max_tokens is None or height * width <= max_tokens:
        return feature_map
    factor = math.ceil(math.sqrt(height * width / max_tokens))
    while math.ceil(height / factor) * math.ceil(width / factor) > max_tokens:
        factor += 1
    return F.adaptive_avg_pool2d(feature_map, (math.ceil(height / factor), math.ceil(width / factor)))


def block_spectra(
        model: nn.Module,
        x: torch.Tensor,
        rel_threshold: float = 1e-2,
        max_k: int = 10,
        center: bool = False,
        cosine: bool = False,
        max_tokens: Optional[int] = 196,
) -> List[TokenSpectrum]:
    """Spectral summary (see ``token_spectrum``) of every block's output tokens.

    Args:
        model: a timm model with ``forward_intermediates``, in eval mode.
        x: (B, 3, H, W) normalised input batch.
        rel_threshold: relative threshold of the significant-eigenvalue count.
        max_k: largest cluster count of the eigengap estimate.
        center: subtract the mean token before building affinities.
        cosine: use the cosine affinity for the spectrum.
        max_tokens: maps with more positions (early CNN/Swin stages) are average-pooled down to at most this
            many tokens, so blocks are compared at a similar N and the N x N problems stay small; None keeps all.

    Returns:
        One ``TokenSpectrum`` per block, in depth order.
    """
    return [
        token_spectrum(
            map_to_tokens(pool_to_max_tokens(feature_map, max_tokens)),
            rel_threshold=rel_threshold, max_k=max_k, center=center, cosine=cosine,
        )
        for feature_map in block_feature_maps(model, x)
    ]


def add_pixel_noise(
        x: torch.Tensor,
        sigma: float,
        std: Sequence[float],
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Add N(0, sigma^2) noise in [0, 1] pixel space to a normalised batch (B, 3, H, W).

    With ``x = (pixels - mean) / std`` the noisy input is ``(pixels + noise - mean) / std = x + noise / std``.
    The result is not clipped, so the input change is exactly Gaussian.
    """
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # drawn on the CPU generator
    return x + sigma * noise / torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def noisy_block_feature_maps(
        model: nn.Module,
        x: torch.Tensor,
        sigma: float,
        num_draws: int,
        generator: torch.Generator,
) -> Iterator[List[torch.Tensor]]:
    """Block feature maps (see ``block_feature_maps``) of ``num_draws`` noisy copies of ``x``, one list per draw.

    The noise is N(0, sigma^2) in [0, 1] pixel space, converted with the std of the model's data config.
    """
    if num_draws < 1:
        raise ValueError(f'num_draws must be >= 1, got {num_draws}')
    std = resolve_model_data_config(model)['std']
    for _ in range(num_draws):
        yield block_feature_maps(model, add_pixel_noise(x, sigma, std, generator))


def relative_change(clean_maps: Sequence[torch.Tensor], noisy_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||noisy - clean||_F / ||clean||_F`` per sample and block.

    Args:
        clean_maps, noisy_maps: one (B, C_l, H_l, W_l) map per block each.

    Returns:
        (B, num_blocks) ratios.
    """
    ratios = [
        (noisy - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1).clamp_min(1e-12)
        for clean, noisy in zip(clean_maps, noisy_maps, strict=True)
    ]
    return torch.stack(ratios, dim=1)


def noise_sensitivity(
        model: nn.Module,
        x: torch.Tensor,
        sigma: float,
        num_draws: int = 4,
        seed: int = 0,
) -> torch.Tensor:
    """Per-block relative feature change ``||f_l(x + n) - f_l(x)|| / ||f_l(x)||`` under Gaussian input noise.

    The noise is N(0, sigma^2) in [0, 1] pixel space (see ``noisy_block_feature_maps``); the ratio is averaged
    over ``num_draws`` draws from a CPU generator seeded with ``seed``.

    Args:
        model: a timm model with ``forward_intermediates``, in eval mode.
        x: (B, 3, H, W) normalised input batch.

    Returns:
        (B, num_blocks) mean ratios.
    """
    clean_maps = block_feature_maps(model, x)
    ratios = [
        relative_change(clean_maps, noisy_maps).cpu()
        for noisy_maps in noisy_block_feature_maps(model, x, sigma, num_draws, torch.Generator().manual_seed(seed))
    ]
    return torch.stack(ratios).mean(dim=0)
