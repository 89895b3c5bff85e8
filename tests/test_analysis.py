"""Tests of fan.analysis: spectral math against naive formulas and scikit-learn/scipy, model hooks, the CLI."""
import json
import math

import numpy as np
import pytest
import scipy.sparse.csgraph
import timm
import torch
import torch.nn as nn
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from fan.analysis import (
    affinity_spectrum,
    block_feature_maps,
    block_spectra,
    effective_rank,
    estimate_num_clusters,
    noise_sensitivity,
    normalized_laplacian,
    pool_to_max_tokens,
    significant_eigenvalue_count,
    spectral_clusters,
    token_affinity,
    token_spectrum,
)
from fan.analysis.cli import create_analysis_model
from fan.analysis.report import default_cluster_blocks
from fan.cli import main
from fan.data import bundled_photos


def planted_tokens(ks, num_tokens=196, channels=64, noise=0.1, seed=0):
    """Tokens drawn around k well-separated (orthogonal, norm sqrt(C)) prototypes per sample.

    Returns (B, N, C) tokens and (B, N) true labels; ``noise`` is the per-channel std around a prototype.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens, labels = [], []
    for k in ks:
        orthonormal, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        prototypes = orthonormal[:k] * math.sqrt(channels)
        label = torch.randint(0, k, (num_tokens,), generator=generator)
        label[:k] = torch.arange(k)  # every cluster present
        tokens.append(prototypes[label] + noise * torch.randn(num_tokens, channels, generator=generator))
        labels.append(label)
    return torch.stack(tokens), torch.stack(labels)


def naive_affinity(tokens, center, cosine):
    """S_ij = <z_i, z_j> with z optionally centred / unit-norm, element by element."""
    batch, num_tokens, _ = tokens.shape
    affinity = torch.zeros(batch, num_tokens, num_tokens, dtype=torch.float64)
    for b in range(batch):
        z = tokens[b].double()
        if center:
            z = z - z.mean(0)
        if cosine:
            z = torch.stack([row / row.norm() for row in z])
        for i in range(num_tokens):
            for j in range(num_tokens):
                affinity[b, i, j] = torch.dot(z[i], z[j])
    return affinity


@pytest.mark.parametrize('center', [False, True])
@pytest.mark.parametrize('cosine', [False, True])
def test_token_affinity_matches_naive(center, cosine):
    tokens = torch.randn(2, 12, 5, dtype=torch.float64)
    torch.testing.assert_close(token_affinity(tokens, center=center, cosine=cosine),
                               naive_affinity(tokens, center, cosine))


@pytest.mark.parametrize('num_tokens, channels', [(30, 8), (20, 48)])  # rank-deficient (N > C) and N < C
@pytest.mark.parametrize('center, cosine', [(False, False), (True, False), (False, True), (True, True)])
def test_affinity_spectrum_matches_eigvalsh_of_naive_affinity(num_tokens, channels, center, cosine):
    tokens = torch.randn(3, num_tokens, channels) * torch.linspace(0.2, 3, channels)
    expected = torch.linalg.eigvalsh(naive_affinity(tokens, center, cosine)).flip(-1)
    spectrum = affinity_spectrum(tokens, center=center, cosine=cosine)
    assert spectrum.shape == (3, num_tokens) and spectrum.dtype == tokens.dtype
    assert (spectrum[:, :-1] >= spectrum[:, 1:]).all()
    torch.testing.assert_close(spectrum.double(), expected.clamp_min(0), atol=1e-5 * expected.max().item(), rtol=1e-5)


def test_spectrum_trace_and_permutation_invariance():
    tokens = torch.randn(2, 40, 16)
    spectrum = affinity_spectrum(tokens, cosine=True)
    torch.testing.assert_close(spectrum.sum(-1), torch.full((2,), 40.0))  # trace of a cosine affinity = N
    permuted = tokens[:, torch.randperm(40)]
    torch.testing.assert_close(affinity_spectrum(permuted), affinity_spectrum(tokens))


def test_significant_count_and_effective_rank_follow_their_formulas():
    eigenvalues = torch.tensor([[10.0, 1.0, 0.1, 0.0999, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0], [0.0] * 5])
    assert significant_eigenvalue_count(eigenvalues, rel_threshold=1e-2).tolist() == [3, 5, 0]
    assert significant_eigenvalue_count(eigenvalues, rel_threshold=1e-3).tolist() == [4, 5, 0]
    p = np.array([10.0, 1.0, 0.1, 0.0999]) / 11.1999
    expected = math.exp(-(p * np.log(p)).sum())
    ranks = effective_rank(eigenvalues[:2])
    assert ranks[0].item() == pytest.approx(expected) and ranks[1].item() == pytest.approx(5.0)


def test_normalized_laplacian_matches_scipy():
    tokens = torch.randn(2, 25, 6, dtype=torch.float64)
    for b in range(2):
        weights = naive_affinity(tokens[b:b + 1], center=True, cosine=True)[0].clamp_min(0).numpy()
        np.fill_diagonal(weights, 0)
        expected = scipy.sparse.csgraph.laplacian(weights, normed=True)
        np.testing.assert_allclose(normalized_laplacian(tokens, center=True)[b].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize('k', [1, 2, 3, 5, 8])
def test_planted_clusters_are_counted_and_recovered(k):
    tokens, labels = planted_tokens([k])
    assert estimate_num_clusters(tokens).tolist() == [k]
    assert significant_eigenvalue_count(affinity_spectrum(tokens, cosine=True)).tolist() == [k]
    found = spectral_clusters(tokens, k)
    assert found.shape == labels.shape and found[0, 0] == 0  # numbered by first appearance
    assert adjusted_rand_score(labels[0], found[0]) == 1.0


def test_cluster_counts_per_sample_and_agreement_with_sklearn():
    tokens, labels = planted_tokens([3, 6, 2], num_tokens=120, channels=32, noise=0.15, seed=3)
    assert estimate_num_clusters(tokens, max_k=10).tolist() == [3, 6, 2]
    capped = estimate_num_clusters(tokens, max_k=4)
    assert capped[0] == 3 and capped[2] == 2 and 1 <= capped[1] <= 4
    weights = naive_affinity(tokens[1:2], center=False, cosine=True)[0].clamp_min(0).numpy()
    np.fill_diagonal(weights, 0)
    sklearn_labels = SpectralClustering(6, affinity='precomputed', random_state=0).fit_predict(weights)
    ours = spectral_clusters(tokens, 6)[1]
    assert adjusted_rand_score(ours, sklearn_labels) == 1.0
    assert adjusted_rand_score(ours, labels[1]) == 1.0


def test_token_spectrum_bundles_the_pieces():
    tokens, _ = planted_tokens([4, 2])
    spectrum = token_spectrum(tokens, rel_threshold=1e-2, max_k=6, cosine=True)
    torch.testing.assert_close(spectrum.eigenvalues, affinity_spectrum(tokens, cosine=True))
    assert spectrum.significant.tolist() == [4, 2]
    assert spectrum.num_clusters.tolist() == [4, 2]
    torch.testing.assert_close(spectrum.effective_rank, effective_rank(spectrum.eigenvalues))


def test_bad_token_shapes_and_arguments_are_rejected():
    with pytest.raises(ValueError, match=r'\(B, N, C\)'):
        affinity_spectrum(torch.randn(10, 4))
    with pytest.raises(ValueError, match='k must be'):
        spectral_clusters(torch.randn(1, 10, 4), 11)
    with pytest.raises(ValueError, match='max_k'):
        estimate_num_clusters(torch.randn(1, 10, 4), max_k=0)


def test_pool_to_max_tokens_averages_blocks():
    feature_map = torch.randn(2, 3, 112, 112)
    pooled = pool_to_max_tokens(feature_map, 196)
    assert pooled.shape == (2, 3, 14, 14)
    torch.testing.assert_close(pooled, feature_map.view(2, 3, 14, 8, 14, 8).mean(dim=(3, 5)))
    assert pool_to_max_tokens(feature_map, None) is feature_map
    small = torch.randn(1, 3, 14, 14)
    assert pool_to_max_tokens(small, 196) is small
    assert math.prod(pool_to_max_tokens(torch.randn(1, 3, 15, 15), 196).shape[-2:]) <= 196


MODELS = [  # name, create_model kwargs, input size: small configs so each builds and runs in well under a second
    ('resnet18', {}, 96),
    ('vit_tiny_patch16_224', dict(img_size=64), 64),
    ('deit_tiny_patch16_224', dict(img_size=64), 64),
    ('xcit_nano_12_p16_224', {}, 64),
    ('convnext_atto', {}, 64),
    ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=24,
                                          num_heads=(1, 1, 1, 1)), 64),
    ('fan_tiny_12_p16_224', {}, 64),
    ('fan_tiny_8_p4_hybrid', {}, 64),
]


@pytest.mark.parametrize('name, kwargs, size', MODELS, ids=[m[0] for m in MODELS])
def test_block_spectra_on_timm_and_fan_models(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    maps = block_feature_maps(model, x)
    spectra = block_spectra(model, x, max_tokens=64, max_k=5)
    assert len(spectra) == len(maps) == len(model.feature_info)
    for feature_map, spectrum in zip(maps, spectra):
        num_tokens = math.prod(pool_to_max_tokens(feature_map, 64).shape[-2:])
        assert spectrum.eigenvalues.shape == (2, num_tokens) and num_tokens <= 64
        assert (spectrum.eigenvalues >= 0).all() and (spectrum.eigenvalues[:, :-1] >= spectrum.eigenvalues[:, 1:]).all()
        assert ((spectrum.significant >= 1) & (spectrum.significant <= num_tokens)).all()
        assert ((spectrum.num_clusters >= 1) & (spectrum.num_clusters <= 5)).all()


def test_models_in_training_mode_are_refused():
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match='eval'):
        block_spectra(model, torch.randn(1, 3, 64, 64))


class AffineBlocks(nn.Module):
    """Two 'blocks' with known outputs: x and 2x + 1."""
    pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.4))

    def forward_intermediates(self, x, indices=None, intermediates_only=True, output_fmt='NCHW'):
        return [x, 2 * x + 1]


def test_noise_sensitivity_matches_naive_ratio():
    model = AffineBlocks().eval()
    x = torch.rand(3, 3, 8, 8)
    sigma, draws = 0.2, 5
    generator = torch.Generator().manual_seed(7)
    std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)
    expected = torch.zeros(3, 2)
    for _ in range(draws):
        noise = sigma * torch.randn(x.shape, generator=generator) / std  # pixel noise in normalised units
        for b in range(3):
            expected[b, 0] += (noise[b].norm() / x[b].norm()) / draws
            expected[b, 1] += ((2 * noise[b]).norm() / (2 * x[b] + 1).norm()) / draws
    torch.testing.assert_close(noise_sensitivity(model, x, sigma, num_draws=draws, seed=7), expected)
    assert noise_sensitivity(model, x, 0.0).abs().max() == 0


def test_noise_sensitivity_grows_with_sigma_on_a_vit():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    small, large = noise_sensitivity(model, x, 0.02, num_draws=2), noise_sensitivity(model, x, 0.2, num_draws=2)
    assert small.shape == (2, 12) and (small > 0).all() and (large > small).all()


def run_cli(argv):
    return main(['spectrum'] + argv)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    for photo in bundled_photos()[:2]:
        photo.image.save(folder / f'{photo.name}.jpg')
    return folder


def test_cli_writes_json_and_figures(image_folder, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / 'resnet18.pth.tar'
    torch.save({'epoch': 3, 'state_dict': timm.create_model('resnet18').state_dict()}, checkpoint)
    out = tmp_path / 'out'
    rc = run_cli(['--model', 'vit_tiny_patch16_224', '--compare', f'resnet18={checkpoint}', '--data',
                  str(image_folder), '--out', str(out), '--draws', '1', '--cluster-blocks', '0', '-1'])
    assert rc == 0
    result = json.loads((out / 'spectrum.json').read_text())
    assert [m['model'] for m in result['models']] == ['vit_tiny_patch16_224', 'resnet18']
    assert result['models'][0]['weights'] == 'random init'
    assert result['models'][1]['weights'] == f'checkpoint {checkpoint}'
    assert len(result['images']) == 2 and result['settings']['num_draws'] == 1
    vit_blocks = result['models'][0]['blocks']
    assert len(vit_blocks) == 12
    for block in vit_blocks:
        assert len(block['spectrum_clean']) == 196 and block['spectrum_clean'][0] == pytest.approx(1.0)
        assert len(block['significant_clean']) == len(block['noise_ratio']) == 2
        assert (block['cluster_maps'] is not None) == (block['index'] in (0, 11))
    assert np.asarray(vit_blocks[11]['cluster_maps']).shape == (2, 14, 14)
    for name in ['spectra.png', 'depth.png', 'clusters/000_chelsea.png', 'clusters/001_coffee.png']:
        assert (out / name).stat().st_size > 10_000


def test_checkpoint_loading_takes_state_dict_or_ema_weights(tmp_path):
    plain, ema = timm.create_model('resnet18').state_dict(), timm.create_model('resnet18').state_dict()
    assert not torch.equal(plain['conv1.weight'], ema['conv1.weight'])
    torch.save({'state_dict': plain, 'state_dict_ema': ema}, tmp_path / 'saver.pth.tar')
    model, weights = create_analysis_model('resnet18', tmp_path / 'saver.pth.tar')
    assert not model.training and weights.startswith('checkpoint')
    torch.testing.assert_close(model.state_dict()['conv1.weight'], plain['conv1.weight'])
    model, weights = create_analysis_model('resnet18', tmp_path / 'saver.pth.tar', use_ema=True)
    assert weights.endswith('(EMA)')
    torch.testing.assert_close(model.state_dict()['conv1.weight'], ema['conv1.weight'])


@pytest.mark.parametrize('problem, message', [
    ('unknown_model', "unknown model 'resnet_18'"),
    ('unreadable_image', 'cannot read image'),
    ('missing_images', 'image path does not exist'),
    ('missing_checkpoint', 'checkpoint not found'),
    ('bad_checkpoint', 'cannot read checkpoint'),
    ('bad_cluster_block', 'cluster block 40 out of range'),
])
def test_cli_reports_bad_input(problem, message, image_folder, tmp_path, capsys):
    args = dict(model='resnet18', images=str(image_folder), checkpoint=None, cluster_block='0')
    if problem == 'unknown_model':
        args['model'] = 'resnet_18'
    elif problem == 'unreadable_image':
        (tmp_path / 'broken.jpg').write_bytes(b'not an image')
        args['images'] = str(tmp_path / 'broken.jpg')
    elif problem == 'missing_images':
        args['images'] = str(tmp_path / 'nowhere')
    elif problem == 'missing_checkpoint':
        args['checkpoint'] = str(tmp_path / 'missing.pth')
    elif problem == 'bad_checkpoint':
        (tmp_path / 'bad.pth').write_bytes(b'garbage')
        args['checkpoint'] = str(tmp_path / 'bad.pth')
    elif problem == 'bad_cluster_block':
        args['cluster_block'] = '40'
    argv = ['--model', args['model'], '--data', args['images'], '--out', str(tmp_path / 'out'), '--draws', '1',
            '--cluster-blocks', args['cluster_block']]
    if args['checkpoint']:
        argv += ['--checkpoint', args['checkpoint']]
    assert run_cli(argv) == 2
    error = capsys.readouterr().err
    assert message in error
    if problem == 'unreadable_image':
        assert 'broken.jpg' in error


def test_default_cluster_blocks_span_the_depth():
    assert default_cluster_blocks(12) == (0, 4, 7, 11)
    assert default_cluster_blocks(5) == (0, 1, 3, 4)
    assert default_cluster_blocks(2) == (0, 1)
