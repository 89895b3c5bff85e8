"""Token-grouping analysis: affinity spectra, eigengap cluster counts, spectral clusters and noise propagation
per block, for FAN and any timm model with ``forward_intermediates``."""
from .blocks import (
    add_pixel_noise,
    block_feature_maps,
    block_spectra,
    map_to_tokens,
    noise_sensitivity,
    noisy_block_feature_maps,
    pool_to_max_tokens,
    relative_change,
)
from .spectrum import (
    TokenSpectrum,
    affinity_spectrum,
    effective_rank,
    estimate_num_clusters,
    normalized_laplacian,
    significant_eigenvalue_count,
    spectral_clusters,
    token_affinity,
    token_spectrum,
)
