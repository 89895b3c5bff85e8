"""Spectral analysis of token features: affinities, eigenvalue spectra, eigengap and spectral clustering.

Every function takes ``tokens`` of shape (B, N, C): B samples, N tokens (patches, without a class token),
C channels. Conventions (the project's documented protocol; the FAN paper released no analysis code):

* affinity ``S = Z Z^T`` of the token matrix Z (N, C) as in the paper; optionally the mean token is subtracted
  first (``center``) and/or each token is scaled to unit L2 norm (``cosine``);
* spectrum: eigenvalues of S, descending; S is symmetric positive semi-definite with rank <= min(N, C);
* significant eigenvalues: ``lambda_i >= rel_threshold * lambda_max``;
* clusters: the normalised graph Laplacian ``L = I - D^-1/2 W D^-1/2`` of ``W = max(cosine affinity, 0)``
  without self-loops (von Luxburg, "A tutorial on spectral clustering", 2007); the number of clusters is the
  eigengap estimate and the labels come from k-means on the first k eigenvectors (rows scaled to unit norm, as
  in Ng, Jordan & Weiss).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import require_extra

__all__ = [
    'TokenSpectrum', 'token_affinity', 'affinity_spectrum', 'significant_eigenvalue_count', 'effective_rank',
    'normalized_laplacian', 'estimate_num_clusters', 'spectral_clusters', 'token_spectrum',
]


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.ndim != 3:
        raise ValueError(f'tokens must be (B, N, C), got shape {tuple(tokens.shape)}')
    if tokens.shape[1] < 2:
        raise ValueError(f'need at least 2 tokens per sample, got N = {tokens.shape[1]}')


def _prepare(tokens: torch.Tensor, center: bool, cosine: bool) -> torch.Tensor:
    """The token matrix the affinity is built from, (B, N, C)."""
    if center:
        tokens = tokens - tokens.mean(dim=1, keepdim=True)
    if cosine:
        tokens = F.normalize(tokens, dim=-1)
    return tokens


def token_affinity(tokens: torch.Tensor, center: bool = False, cosine: bool = False) -> torch.Tensor:
    """Token affinity ``S = Z Z^T`` per sample.

    Args:
        tokens: (B, N, C) token features.
        center: subtract the mean token of each sample first.
        cosine: scale each token to unit norm, so S holds cosine similarities.

    Returns:
        (B, N, N) symmetric affinity.
    """
    _check_tokens(tokens)
    z = _prepare(tokens, center, cosine)
    return z @ z.transpose(1, 2)


def affinity_spectrum(tokens: torch.Tensor, center: bool = False, cosine: bool = False) -> torch.Tensor:
    """Eigenvalues of ``token_affinity(tokens, center, cosine)``, computed in float64.

    ``Z Z^T`` (N x N) and ``Z^T Z`` (C x C) share their non-zero eigenvalues, so the smaller of the two is
    decomposed and the spectrum padded with zeros to N.

    Returns:
        (B, N) eigenvalues, descending, in the dtype of ``tokens``.
    """
    _check_tokens(tokens)
    num_tokens, num_channels = tokens.shape[1:]
    z = _prepare(tokens.to(torch.float64), center, cosine)
    gram = z @ z.transpose(1, 2) if num_tokens <= num_channels else z.transpose(1, 2) @ z
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)  # (B, min(N, C)), descending
    eigenvalues = F.pad(eigenvalues, (0, num_tokens - eigenvalues.shape[1]))  # rank <= C: the rest are zero
    return eigenvalues.to(tokens.dtype)


def significant_eigenvalue_count(eigenvalues: torch.Tensor, rel_threshold: float = 1e-2) -> torch.Tensor:
    """Number of eigenvalues at least ``rel_threshold`` times the largest one.

    Args:
        eigenvalues: (B, N) non-negative eigenvalues (any order).

    Returns:
        (B,) int64 counts; 0 for an all-zero spectrum.
    """
    lambda_max = eigenvalues.amax(dim=-1, keepdim=True)
    return ((eigenvalues >= rel_threshold * lambda_max) & (eigenvalues > 0)).sum(dim=-1)


def effective_rank(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Threshold-free rank ``exp(H(p))`` with ``p = lambda / sum(lambda)`` (Roy & Vetterli, 2007).

    Args:
        eigenvalues: (B, N) non-negative eigenvalues, not all zero.

    Returns:
        (B,) effective ranks in [1, N].
    """
    p = eigenvalues.clamp_min(0) / eigenvalues.clamp_min(0).sum(dim=-1, keepdim=True)
    return torch.special.entr(p).sum(dim=-1).exp()


def normalized_laplacian(tokens: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Normalised graph Laplacian ``I - D^-1/2 W D^-1/2`` with ``W = max(cosine affinity, 0)``, diagonal zeroed.

    Args:
        tokens: (B, N, C) token features.
        center: subtract the mean token before the cosine affinity.

    Returns:
        (B, N, N) symmetric Laplacian in float64; its eigenvalues lie in [0, 2].
    """
    _check_tokens(tokens)
    identity = torch.eye(tokens.shape[1], dtype=torch.float64, device=tokens.device)
    weights = token_affinity(tokens.to(torch.float64), center=center, cosine=True).clamp_min(0) * (1 - identity)
    inv_sqrt_degree = weights.sum(dim=-1).clamp_min(1e-12).rsqrt()  # (B, N)
    return identity - inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :]


def estimate_num_clusters(tokens: torch.Tensor, max_k: int = 10, center: bool = False) -> torch.Tensor:
    """Number of token clusters per sample by the eigengap heuristic on the normalised Laplacian.

    Args:
        tokens: (B, N, C) token features.
        max_k: largest number of clusters considered (capped at N - 1).
        center: subtract the mean token before the cosine affinity.

    Returns:
        (B,) int64 estimates in [1, max_k].
    """
    _check_tokens(tokens)
    if max_k < 1:
        raise ValueError(f'max_k must be >= 1, got {max_k}')
    max_k = min(max_k, tokens.shape[1] - 1)
    laplacian_eigenvalues = torch.linalg.eigvalsh(normalized_laplacian(tokens, center))  # (B, N), ascending
    gaps = laplacian_eigenvalues[:, 1:max_k + 1] - laplacian_eigenvalues[:, :max_k]  # gaps[:, k-1] = mu_{k+1} - mu_k
    return gaps.argmax(dim=-1) + 1


def _labels_in_order_of_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels so that cluster 0 holds the first token, cluster 1 the next new one, and so on."""
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank_by_appearance = np.argsort(np.argsort(first_index))
    return rank_by_appearance[inverse]


def spectral_clusters(tokens: torch.Tensor, k: int, center: bool = False, seed: int = 0) -> torch.Tensor:
    """Normalised spectral clustering of the tokens of each sample into ``k`` groups.

    k-means (scikit-learn, 10 restarts) runs on the rows of the first k Laplacian eigenvectors, each row scaled
    to unit norm. Labels are numbered by first appearance in token order, so cluster 0 holds token 0.

    Args:
        tokens: (B, N, C) token features.
        k: number of clusters, 1 <= k <= N.
        center: subtract the mean token before the cosine affinity.
        seed: k-means random state.

    Returns:
        (B, N) int64 cluster labels in [0, k).
    """
    _check_tokens(tokens)
    if not 1 <= k <= tokens.shape[1]:
        raise ValueError(f'k must be in [1, N = {tokens.shape[1]}], got {k}')
    _, eigenvectors = torch.linalg.eigh(normalized_laplacian(tokens, center))
    embedding = F.normalize(eigenvectors[:, :, :k], dim=-1).cpu().numpy()  # (B, N, k)
    labels = [
        _labels_in_order_of_appearance(require_extra('sklearn.cluster', 'analysis').KMeans(
            n_clusters=k, n_init=10, random_state=seed).fit_predict(sample))
        for sample in embedding
    ]
    return torch.from_numpy(np.stack(labels)).long()


@dataclass
class TokenSpectrum:
    """Spectral summary of one set of token features (one block)."""
    eigenvalues: torch.Tensor  # (B, N) affinity eigenvalues, descending
    significant: torch.Tensor  # (B,) significant-eigenvalue count
    effective_rank: torch.Tensor  # (B,) effective rank of the affinity spectrum
    num_clusters: torch.Tensor  # (B,) eigengap estimate of the cluster count


def token_spectrum(
        tokens: torch.Tensor,
        rel_threshold: float = 1e-2,
        max_k: int = 10,
        center: bool = False,
        cosine: bool = False,
) -> TokenSpectrum:
    """Affinity spectrum, significant-eigenvalue count, effective rank and eigengap cluster count of (B, N, C) tokens.

    ``center`` applies to both the affinity spectrum and the Laplacian; ``cosine`` to the spectrum only (the
    Laplacian always uses the cosine affinity).
    """
    eigenvalues = affinity_spectrum(tokens, center=center, cosine=cosine)
    return TokenSpectrum(
        eigenvalues=eigenvalues,
        significant=significant_eigenvalue_count(eigenvalues, rel_threshold),
        effective_rank=effective_rank(eigenvalues),
        num_clusters=estimate_num_clusters(tokens, max_k=max_k, center=center),
    )
