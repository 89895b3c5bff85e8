"""ASH shapings, OOD scores, metrics and the detector, checked against naive implementations of the formulas."""
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from fan.cli import main
from fan.ood import (
    AshDetector, ImageFiles, ash_b, ash_p, ash_rand, ash_s, energy, keep_count, max_logit, msp, ood_metrics, scale,
)


# ----------------------------------------------------------------------------- naive references, one sample at a time

def naive_top_k(row: list, k: int) -> list:
    """Indices of the k largest values (stable order for ties)."""
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def naive_shaping(x: torch.Tensor, percentile: float, variant: str) -> torch.Tensor:
    out = []
    for sample in x:
        row = sample.reshape(-1).tolist()
        n = len(row)
        k = n - int(np.round(n * percentile / 100))  # the reference's k, np.round = half to even
        keep = naive_top_k(row, k)
        s1, s2 = sum(row), sum(row[i] for i in keep)
        shaped = [0.0] * n
        for i in range(n):
            if variant == 'scale':
                shaped[i] = row[i] * math.exp(s1 / s2)
            elif i in keep:
                shaped[i] = {'ash_p': row[i], 'ash_b': s1 / k, 'ash_s': row[i] * math.exp(s1 / s2)}[variant]
        out.append(torch.tensor(shaped, dtype=torch.float64).reshape(sample.shape))
    return torch.stack(out)


def naive_auroc(id_scores, ood_scores) -> float:
    wins = sum((a > b) + 0.5 * (a == b) for a in id_scores for b in ood_scores)
    return wins / (len(id_scores) * len(ood_scores))


def naive_average_precision(positive, negative) -> float:
    """Sum over distinct thresholds t (descending) of (recall(t) - recall(previous t)) * precision(t)."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(positive) | set(negative), reverse=True):
        tp = sum(s >= t for s in positive)
        fp = sum(s >= t for s in negative)
        recall = tp / len(positive)
        ap += (recall - previous_recall) * tp / (tp + fp)
        previous_recall = recall
    return ap


def naive_fpr95(id_scores, ood_scores) -> float:
    """Highest threshold keeping at least 95 % of ID; share of OOD at or above it."""
    ranked = sorted(id_scores, reverse=True)
    threshold = ranked[math.ceil(0.95 * len(ranked) - 1e-9) - 1]
    return sum(s >= threshold for s in ood_scores) / len(ood_scores)


# ----------------------------------------------------------------------------- shapings

@pytest.mark.parametrize('shape', [(4, 37), (3, 6, 3, 5)])
@pytest.mark.parametrize('percentile', [0, 60, 90, 97.5])
@pytest.mark.parametrize('variant', ['ash_p', 'ash_b', 'ash_s', 'scale'])
def test_shaping_matches_formula(shape, percentile, variant):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64).abs() + 0.01  # post-ReLU-like, so ASH-S is well defined
    if variant == 'ash_p':  # signed values too: ASH keeps the largest signed values, not magnitudes
        x = torch.randn(shape, dtype=torch.float64)
    original = x.clone()
    shaped = {'ash_p': ash_p, 'ash_b': ash_b, 'ash_s': ash_s, 'scale': scale}[variant](x, percentile)
    torch.testing.assert_close(shaped, naive_shaping(original, percentile, variant))
    assert torch.equal(x, original), 'the caller\'s tensor must not be modified'


def test_keep_count_matches_reference_table():
    # (n, percentile, k) rows of the ASH reference table, plus a half-to-even case: 10 * 25 / 100 = 2.5 -> 2
    for n, p, k in [(2048, 90, 205), (2048, 65, 717), (2048, 60, 819), (342, 95, 17), (768, 95, 38),
                    (192, 90, 19), (384, 90, 38), (448, 90, 45), (480, 90, 48), (10, 25, 8)]:
        assert keep_count(n, p) == k


def test_exactly_k_survive_ties_and_sum_preserved():
    x = torch.ones(2, 50)
    assert (ash_p(x, 90) != 0).sum(dim=1).tolist() == [5, 5]
    x = torch.rand(3, 8, 4, 4)
    torch.testing.assert_close(ash_b(x, 80).sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # ASH-B keeps s1


def test_shaping_handles_non_contiguous_input():
    x = torch.rand(16, 4).t()  # (4, 16), not contiguous
    torch.testing.assert_close(ash_s(x, 75), ash_s(x.contiguous(), 75))


def test_ash_rand_noise_only_in_top_slots():
    x = torch.randn(5, 40)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    out = ash_rand(x, 90, low=2., high=3., generator=g1)
    top = x.topk(4, dim=1).indices
    mask = torch.zeros_like(x, dtype=torch.bool).scatter(1, top, True)
    assert (out[~mask] == 0).all()
    assert ((out[mask] >= 2) & (out[mask] < 3)).all()
    assert torch.equal(out, ash_rand(x, 90, low=2., high=3., generator=g2))


def test_bad_shaping_input():
    with pytest.raises(ValueError, match='0-100'):
        ash_s(torch.rand(2, 10), 0.9 * 1000)
    with pytest.raises(ValueError, match='keeps no activation'):
        ash_p(torch.rand(2, 10), 100)
    with pytest.raises(ValueError, match='batch dimension'):
        ash_b(torch.rand(10), 50)


# ----------------------------------------------------------------------------- scores and metrics

def test_scores_match_formulas():
    logits = torch.randn(6, 9, dtype=torch.float64)
    rows = logits.tolist()
    assert torch.allclose(energy(logits), torch.tensor([math.log(sum(math.exp(v) for v in r)) for r in rows],
                                                       dtype=torch.float64))
    assert torch.allclose(energy(logits, temperature=2.),
                          torch.tensor([2 * math.log(sum(math.exp(v / 2) for v in r)) for r in rows],
                                       dtype=torch.float64))
    assert torch.allclose(msp(logits), torch.tensor([math.exp(max(r)) / sum(math.exp(v) for v in r) for r in rows],
                                                    dtype=torch.float64))
    assert max_logit(logits).tolist() == [max(r) for r in rows]


@pytest.mark.parametrize('seed, n_id, n_ood, ties', [(0, 40, 25, False), (1, 23, 31, True), (2, 100, 7, True)])
def test_ood_metrics_match_formulas_and_sklearn(seed, n_id, n_ood, ties):
    rng = np.random.default_rng(seed)
    id_scores, ood_scores = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
    if ties:  # coarse scores make many ID/OOD ties
        id_scores, ood_scores = np.round(id_scores * 2) / 2, np.round(ood_scores * 2) / 2
    m = ood_metrics(id_scores, ood_scores)
    assert set(m) == {'auroc', 'aupr_in', 'aupr_out', 'fpr95'}
    assert m['auroc'] == pytest.approx(naive_auroc(id_scores, ood_scores))
    assert m['aupr_in'] == pytest.approx(naive_average_precision(list(id_scores), list(ood_scores)))
    assert m['aupr_out'] == pytest.approx(naive_average_precision(list(-ood_scores), list(-id_scores)))
    assert m['fpr95'] == pytest.approx(naive_fpr95(list(id_scores), list(ood_scores)))
    # scikit-learn with OOD as the positive class and the negated score (OpenOOD / pytorch-ood style)
    labels_ood = np.r_[np.zeros(n_id), np.ones(n_ood)]
    outlier_scores = -np.r_[id_scores, ood_scores]
    assert m['auroc'] == pytest.approx(roc_auc_score(labels_ood, outlier_scores))
    assert m['aupr_out'] == pytest.approx(average_precision_score(labels_ood, outlier_scores))
    assert all(0 <= v <= 1 for v in m.values())


def test_ood_metrics_conventions():
    perfect = ood_metrics(torch.tensor([5., 6., 7.]), [1., 2.])
    assert perfect == {'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0, 'fpr95': 0.0}
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=30), rng.normal(size=20) - 1
    assert ood_metrics(b, a)['auroc'] == pytest.approx(1 - ood_metrics(a, b)['auroc'])
    # all OOD above all ID: every OOD sample is accepted at 95 % ID recall
    assert ood_metrics([0., 1.], [5., 6.])['fpr95'] == 1.0
    with pytest.raises(ValueError, match='NaN'):
        ood_metrics([1., float('nan')], [0.])
    with pytest.raises(ValueError, match='empty'):
        ood_metrics([], [0.])


# ----------------------------------------------------------------------------- detector on timm models

def _small(name: str) -> torch.nn.Module:
    kwargs = {'img_size': 32} if name.startswith(('vit', 'xcit')) else {}
    return timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224', 'convnext_atto', 'xcit_nano_12_p16_224'])
def test_detector_works_on_timm_models(name):
    torch.manual_seed(0)
    model, images = _small(name), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        # no shaping: the detector reproduces the model's own logits
        torch.testing.assert_close(AshDetector(model, 'none', score='max_logit')(images), logits.amax(dim=1))
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        shaped_logits = model.get_classifier()(ash_b(features, 80))
        torch.testing.assert_close(AshDetector(model, 'ash_b', 80, 'msp')(images), shaped_logits.softmax(1).amax(1))
        relu_logits = model.get_classifier()(ash_p(features.clamp(min=0), 50))
        torch.testing.assert_close(AshDetector(model, 'ash_p', 50, rectify=True)(images), relu_logits.logsumexp(1))


def test_detector_layer_hook():
    torch.manual_seed(0)
    model, images = _small('resnet18'), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        hooked = AshDetector(model, 'ash_s', 90, layer='global_pool')(images)
        # resnet18's global_pool output is its pre-logits, so both places must agree
        torch.testing.assert_close(hooked, AshDetector(model, 'ash_s', 90)(images))
        hooked_map = AshDetector(model, 'ash_p', 90, layer='layer4')(images)  # a (B, 512, 1, 1) map
        assert not torch.allclose(hooked_map, energy(before))
        torch.testing.assert_close(model(images), before)  # the hook is gone afterwards
    with pytest.raises(ValueError, match="no sub-module 'layer9'"):
        AshDetector(model, layer='layer9')
    with pytest.raises(ValueError, match='unknown shaping'):
        AshDetector(model, 'ash_x')
    with pytest.raises(ValueError, match='no single classifier'):
        AshDetector(timm.create_model('resnet18', num_classes=0))


def test_fan_model_shaping():
    torch.manual_seed(0)
    model, images = timm.create_model('fan_tiny_12_p16_224', num_classes=5).eval(), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(AshDetector(model, 'none')(images), energy(model(images)))
        assert AshDetector(model, 'ash_s', 90, rectify=True)(images).shape == (2,)


# ----------------------------------------------------------------------------- command line

def _write_images(folder, count, seed, noise):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if noise:
            array = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        else:
            array = np.full((24, 24, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f'{i}.png')


def test_cli_ood(tmp_path, capsys):
    _write_images(tmp_path / 'id' / 'class_a', 6, 0, noise=False)
    _write_images(tmp_path / 'noise', 5, 1, noise=True)
    torch.manual_seed(0)
    checkpoint = tmp_path / 'model.pth'
    torch.save(timm.create_model('resnet18', num_classes=3).state_dict(), checkpoint)
    args = ['ood', '--model', 'resnet18', '--checkpoint', str(checkpoint), '--num-classes', '3', '--img-size', '32',
            '--data', str(tmp_path / 'id'), '--ood', str(tmp_path / 'noise'), '--workers', '0',
            '--shaping', 'none', 'ash_s', '--percentile', '80', '--rectify', '--out', str(tmp_path / 'out')]
    assert main(args) == 0
    report = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert [r['shaping'] for r in report['results']] == ['none', 'ash_s']
    for result in report['results']:
        assert all(0 <= v <= 1 for v in result['metrics']['noise'].values())
    scores = np.load(tmp_path / 'out' / 'scores_relu+ash_s@80.npz')
    assert scores['ID'].shape == (6,) and scores['noise'].shape == (5,)
    assert ood_metrics(scores['ID'], scores['noise']) == report['results'][1]['metrics']['noise']
    assert 'FPR95' in capsys.readouterr().out


def test_image_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        ImageFiles(str(tmp_path / 'nowhere'), transform=None)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images'):
        ImageFiles(str(tmp_path / 'empty'), transform=None)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'broken.jpg').write_bytes(b'not an image')
    with pytest.raises(ValueError, match=r'none of the 1 image file\(s\) could be read .*broken.jpg'):
        ImageFiles(str(tmp_path / 'bad'), transform=None)  # (unreadable files are skipped up front, and named)
