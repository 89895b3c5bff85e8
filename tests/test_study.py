"""fan study fashion-mnist on a synthetic 10-class IDX set: training that resumes exactly, the batch augmentation
against a naive shift and flip, Fashion-MNIST-C at 28 px (make-c names a corruption that cannot apply), CE normalised
by a reference model against the formula, and the whole study end to end (report, resume)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fan.study.training as training
from fan.cli import main
from fan.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from fan.robustness.corrupt import make_imagenet_c
from fan.robustness.metrics import SEVERITIES, STANDARD_CORRUPTIONS, summarize_corruption_errors

from test_fashion_mnist import write_idx

pytest.importorskip('imagecorruptions')
pytest.importorskip('sklearn')


def _ten_class_images(count: int, rng: np.random.Generator):
    """(count, 28, 28) uint8 noise with a bright 7 x 7 square at a class-specific place; labels 0-9 in turn."""
    labels = np.arange(count) % 10
    images = rng.integers(0, 50, (count, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 4)
        image[row * 7 + 3:row * 7 + 10, col * 7:col * 7 + 7] += 200
    return images, labels


@pytest.fixture(scope='module')
def ten_class_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fashion10')
    rng = np.random.default_rng(0)
    for prefix, count in (('train', 320), ('t10k', 100)):
        write_idx(folder, prefix, *_ten_class_images(count, rng))
    return folder


def test_batch_augmentation_is_a_shift_and_a_flip():
    """prepare_batch: each image shifted by its own offset in [-2, 2] (zero padding) and flipped or not, then
    normalised; checked against padding and cropping image by image."""
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    recipe = training.Recipe()
    out = training.prepare_batch(images, 28, recipe, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 5, (16, 2), generator=generator)
    flips = torch.rand(16, generator=generator) < recipe.hflip
    assert 0 < flips.sum() < 16
    for i in range(16):
        padded = F.pad(images[i].float() / 255, (2, 2, 2, 2))
        expected = padded[offsets[i, 0]:offsets[i, 0] + 28, offsets[i, 1]:offsets[i, 1] + 28]
        expected = expected.flip(-1) if flips[i] else expected
        torch.testing.assert_close(out[i, 0], (expected - MEAN[0]) / STD[0])
    resized = training.prepare_batch(images, 32)
    assert resized.shape == (16, 1, 32, 32)


def test_training_resumes_exactly(ten_class_folder, tmp_path, monkeypatch):
    """A run stopped after a mid-epoch checkpoint continues to the same weights as an uninterrupted one."""
    data = load_fashion_mnist(ten_class_folder)
    spec = next(s for s in training.MODELS if s.key == 'convnet')
    recipe = training.Recipe(epochs=2, warmup_steps=2)
    reference = training.train_run(spec, 0, recipe, data, tmp_path / 'a')
    monkeypatch.setattr(training, 'CHECKPOINT_SECONDS', 0.)

    def stop(step, total, values):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train_run(spec, 0, recipe, data, tmp_path / 'b', progress=stop)
    assert (tmp_path / 'b' / 'checkpoint.pth').is_file() and not (tmp_path / 'b' / 'weights.pth').exists()
    resumed = training.train_run(spec, 0, recipe, data, tmp_path / 'b')
    a, b = (torch.load(tmp_path / run / 'weights.pth', weights_only=True) for run in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e['test_top1'] for e in resumed['epochs']] == [e['test_top1'] for e in reference['epochs']]


def test_make_c_at_28_px_and_below(tmp_path):
    """make-c --size 0 corrupts 28 px images with every corruption (the package itself refuses under 32 px); a 1 px
    image cannot be pixelated, which the manifest names instead of dropping it silently."""
    source = tmp_path / 'src'
    (source / 'a').mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), 'L').save(source / 'a/x.png')
    manifest = make_imagenet_c(source, tmp_path / 'c', STANDARD_CORRUPTIONS, (1, 5), seed=0, size=0)
    assert manifest['not_applicable'] == {} and manifest['files_written'] == 30
    assert Image.open(tmp_path / 'c' / 'frost' / '5' / 'a' / 'x.JPEG').size == (28, 28)
    Image.fromarray(np.zeros((1, 1), np.uint8), 'L').save(source / 'a/tiny.png')
    manifest = make_imagenet_c(source, tmp_path / 'c', ('gaussian_noise', 'pixelate'), (3,), seed=0, size=0)
    assert list(manifest['not_applicable']) == ['pixelate'] and 'cannot apply at 1x1 px' in \
        manifest['not_applicable']['pixelate']
    assert (tmp_path / 'c' / 'gaussian_noise' / '3' / 'a' / 'tiny.JPEG').is_file()


def test_corruption_errors_normalised_by_a_reference_model():
    rng = np.random.default_rng(1)
    errors = {c: {s: float(rng.uniform(10, 60)) for s in SEVERITIES} for c in STANDARD_CORRUPTIONS}
    reference = {c: {s: float(rng.uniform(10, 60)) for s in SEVERITIES} for c in STANDARD_CORRUPTIONS}
    summary = summarize_corruption_errors(errors, 8., reference_errors=reference, reference_clean_error=6.)
    for c in STANDARD_CORRUPTIONS:
        assert summary['ce'][c] == pytest.approx(100 * sum(errors[c].values()) / sum(reference[c].values()))
        assert summary['relative_ce'][c] == pytest.approx(
            100 * sum(e - 8 for e in errors[c].values()) / sum(e - 6 for e in reference[c].values()))
    assert summary['mce'] == pytest.approx(np.mean(list(summary['ce'].values())))
    itself = summarize_corruption_errors(reference, 6., reference_errors=reference, reference_clean_error=6.)
    assert itself['mce'] == pytest.approx(100) and itself['relative_mce'] == pytest.approx(100)


def test_study_end_to_end_and_resume(ten_class_folder, tmp_path, capsys):
    """Two models, two seeds, one epoch: every measurement reaches results.json and the report; the ConvNet
    normalises the CE (its own mCE is 100); a second run trains nothing and gives the same results."""
    out, report = tmp_path / 'study', tmp_path / 'docs'
    args = ['study', 'fashion-mnist', '--data', str(ten_class_folder), '--models', 'fan_vit', 'convnet',
            '--seeds', '0', '1', '--epochs', '1', '--c-images', '10', '--out', str(out), '--report', str(report)]
    assert main(args) == 0
    results = json.loads((out / 'results.json').read_text())
    assert set(results['models']) == {'fan_vit', 'convnet'}
    assert set(results['runs']) == {'fan_vit-seed0', 'fan_vit-seed1', 'convnet-seed0', 'convnet-seed1'}
    convnet, fan_vit = results['models']['convnet'], results['models']['fan_vit']
    assert convnet['corruption']['mce'] == pytest.approx(100)
    assert fan_vit['corruption']['mce'] > 0 and set(fan_vit['corruption']['ce']) == set(STANDARD_CORRUPTIONS)
    assert set(fan_vit['top1_per_seed']) == {'0', '1'} and 0 <= fan_vit['top1_mean'] <= 1
    assert set(fan_vit['ood']) == {'energy', 'ash_s@90', 'ash_b@90'}
    assert 0 <= fan_vit['ood']['energy']['auroc'] <= 1
    spectrum = fan_vit['spectrum']
    assert len(spectrum['trained']) == len(spectrum['untrained']) == 2  # FAN-ViT micro: 2 blocks
    assert set(results['transfer']) == {'fan_vit', 'convnet'}
    assert set(results['transfer']['fan_vit']) == {'lp', 'ft', 'lpft'}
    text = (report / 'README.md').read_text()
    for heading in ('Clean accuracy', 'Fashion-MNIST-C', 'Out-of-distribution', 'Token spectra', 'LP-FT'):
        assert f'## {heading}' in text
    assert 'fan_micro_2_p4_28' in text and (report / 'accuracy_and_ce.png').is_file()
    weights = {path: path.stat().st_mtime_ns for path in (out / 'runs').rglob('weights.pth')}
    assert len(weights) == 6  # 4 runs and the LP-FT sources of both models

    assert main(args) == 0
    assert {path: path.stat().st_mtime_ns for path in (out / 'runs').rglob('weights.pth')} == weights
    again = json.loads((out / 'results.json').read_text())
    assert again['models'] == results['models'] and again['transfer'] == results['transfer']


def test_study_refuses_bad_models(ten_class_folder, tmp_path, capsys):
    """An unknown model, or a study without the ConvNet that normalises the CE: one line, status 2."""
    base = ['study', 'fashion-mnist', '--data', str(ten_class_folder), '--out', str(tmp_path), '--models']
    assert main(base + ['resnet', 'convnet']) == 2
    assert "unknown study model(s) ['resnet']" in capsys.readouterr().err
    assert main(base + ['fan_vit']) == 2
    assert "--models needs 'convnet'" in capsys.readouterr().err
    assert main(base + ['vit', 'convnet', '--weights-only']) == 2
    assert '--weights-only trains FAN models only, and --models names none' in capsys.readouterr().err


def test_weights_only_trains_and_exports_the_fan_models(ten_class_folder, tmp_path, capsys):
    """--weights-only: the FAN models among --models are trained and exported (float16 safetensors and their
    record), the baselines and the measurements are skipped."""
    out = tmp_path / 'release'
    assert main(['study', 'fashion-mnist', '--data', str(ten_class_folder), '--models', 'fan_vit', 'vit',
                 '--seeds', '1', '--epochs', '2', '--weights-only', '--out', str(out)]) == 0
    assert sorted(p.name for p in (out / 'runs').iterdir()) == ['fan_vit-seed1']
    assert not (out / 'results.json').exists()
    record = json.loads((out / 'weights' / 'fan_micro_2_p4_28.fashion_mnist.json').read_text())
    history = json.loads((out / 'runs' / 'fan_vit-seed1' / 'history.json').read_text())
    assert record['command'] == ('fan study fashion-mnist --epochs 2 --seeds 1 -b 128 --models fan_vit vit '
                                 '--weights-only')
    assert record['epoch_top1'] == [round(epoch['test_top1'], 4) for epoch in history['epochs']] and record['seed'] == 1
    assert record['train_minutes'] == round(history['epochs'][-1]['train_seconds'] / 60, 1)
    assert abs(record['test_top1'] - history['epochs'][-1]['test_top1']) <= 0.02  # float16 against float32
    assert 'fan_micro_2_p4_28.fashion_mnist: test top-1' in capsys.readouterr().out
