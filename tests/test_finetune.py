"""Linear probe, fine-tuning and LP-FT on tiny image folders written to tmp_path."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from timm.data import create_transform

from fan import create_model, resolve_data_config
from fan.cli import main
from fan.finetune import (
    feature_distortion, fine_tune, fit_linear_probe, load_image_folders, run_transfer, set_linear_classifier,
)

COLOURS = ((200, 40, 40), (40, 180, 40), (40, 60, 200))  # one class per dominant colour


def write_split(root: Path, per_class: int, seed: int, shifted: bool = False) -> None:
    """Noisy images of three colour classes; ``shifted`` adds stripes and a brightness offset (the OOD shift)."""
    rng = np.random.default_rng(seed)
    columns = np.arange(32)
    for label, colour in enumerate(COLOURS):
        folder = root / f'class_{label}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.array(colour, float) * rng.uniform(0.6, 1.2) + rng.normal(0, 30, (32, 32, 3))
            if shifted:
                image = image * (0.5 + 0.5 * np.sin(columns * rng.uniform(0.5, 1.5)))[None, :, None] + 60
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f'{i}.png')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('colours')
    write_split(root / 'data' / 'train', 8, seed=0)
    write_split(root / 'data' / 'val', 4, seed=1)
    write_split(root / 'ood', 4, seed=2, shifted=True)
    return root


def small_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('resnet18', pretrained=False, num_classes=10)


def folders(root: Path, model: torch.nn.Module, ood: bool = True):
    transform = create_transform(**resolve_data_config(model, img_size=32))
    return load_image_folders(str(root / 'data'), transform, transform, str(root / 'ood') if ood else None)




# ----------------------------------------------------------------------------- linear probe

def blobs(seed: int, num_classes: int, n: int, dim: int = 6):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    centres = rng.normal(0, 1.5, (num_classes, dim)) + 3.0  # offset: standardisation must be undone correctly
    return torch.tensor(centres[labels] + rng.normal(0, 1.5, (n, dim))), torch.tensor(labels)


@pytest.mark.parametrize('num_classes', [2, 4])
def test_probe_weights_reproduce_sklearn_in_raw_feature_space(num_classes):
    x_train, y_train = blobs(0, num_classes, 60)
    x_val, y_val = blobs(1, num_classes, 30)
    probe = fit_linear_probe(x_train, y_train, x_val, y_val, num_classes, cs=[0.05])
    mean, std = x_train.numpy().mean(), x_train.numpy().std()
    reference = LogisticRegression(C=0.05, max_iter=200).fit((x_train.numpy() - mean) / std, y_train.numpy())
    expected = reference.predict_proba((x_val.numpy() - mean) / std)
    probabilities = (x_val.float() @ probe.weight.T + probe.bias).softmax(dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert probe.val_accuracy == pytest.approx(reference.score((x_val.numpy() - mean) / std, y_val.numpy()))


def test_probe_sweep_keeps_best_validation_accuracy_then_lowest_loss():
    x_train, y_train = blobs(2, 3, 60)
    x_val, y_val = blobs(3, 3, 45)
    probe = fit_linear_probe(x_train, y_train, x_val, y_val, 3, cs=np.logspace(-4, 2, 7))
    assert [row['c'] for row in probe.sweep] == pytest.approx(list(np.logspace(-4, 2, 7)))
    best = max(probe.sweep, key=lambda row: (row['val_accuracy'], -row['val_loss']))
    assert probe.c == best['c'] and probe.val_accuracy == best['val_accuracy']
    accuracy = ((x_val.float() @ probe.weight.T + probe.bias).argmax(1) == y_val).float().mean().item()
    assert accuracy == pytest.approx(probe.val_accuracy)
    assert probe.sweep[0]['val_loss'] == pytest.approx(np.log(3), abs=0.01)  # C = 1e-4: nearly uniform


def test_probe_errors():
    x, y = blobs(0, 3, 30)
    with pytest.raises(ValueError, match='cover classes'):
        fit_linear_probe(x, y, x, y, 4)
    with pytest.raises(ValueError, match='constant'):
        fit_linear_probe(torch.ones(30, 6), y, x, y, 3)


def test_set_linear_classifier_and_distortion():
    model = small_resnet().eval()
    weight, bias = torch.randn(3, model.num_features), torch.randn(3)
    set_linear_classifier(model, weight, bias)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(model(images), features @ weight.T + bias)
    assert feature_distortion(torch.zeros(2, 2), torch.tensor([[3., 4.], [0., 1.]])) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- transfer runs

def test_lpft_distorts_features_less_than_ft(dataset, tmp_path):
    results = {}
    for mode in ('lp', 'ft', 'lpft'):
        model = small_resnet()
        # the same learning rate for FT and LP-FT: any difference comes from starting at the probe's head
        results[mode] = run_transfer(model, folders(dataset, model), mode, tmp_path / mode, epochs=2, lr=0.01,
                                     batch_size=8, workers=0, cs=np.logspace(-4, 2, 13))
    lp, ft, lpft = results['lp'], results['ft'], results['lpft']
    assert lp['id_distortion'] == 0 and lp['ood_distortion'] == 0  # a probe leaves the backbone alone
    assert lp['id_accuracy'] >= 0.9  # colour classes are linearly separable even in random features
    assert lp['id_accuracy'] == pytest.approx(lp['linear_probe']['val_accuracy'])  # the probe became the head
    assert ft['id_distortion'] > 0.05 and ft['ood_distortion'] > 0.05
    assert lpft['id_distortion'] < 0.25 * ft['id_distortion']
    assert lpft['ood_distortion'] < 0.25 * ft['ood_distortion']
    assert lpft['id_accuracy'] >= ft['id_accuracy'] and lpft['ood_accuracy'] >= ft['ood_accuracy']
    assert lpft['linear_probe']['c'] == lp['linear_probe']['c']
    assert json.loads((tmp_path / 'lpft' / 'results.json').read_text()) == lpft
    # the saved model is the one that was evaluated, and it loads through the model path with its own head
    reloaded = create_model('resnet18', checkpoint=tmp_path / 'lpft' / 'model_best.pth')
    assert reloaded.num_classes == 3
    data = folders(dataset, reloaded, ood=False)
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    labels = torch.tensor(data.val.targets)
    with torch.no_grad():
        accuracy = (reloaded.eval()(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(lpft['id_accuracy'])


def test_fan_model_transfers(dataset, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('fan_tiny_12_p16_224')
    lp = run_transfer(model, folders(dataset, model), 'lp', tmp_path / 'lp', batch_size=12, workers=0, cs=[1e-2, 1e2])
    assert lp['id_accuracy'] == pytest.approx(lp['linear_probe']['val_accuracy'])
    assert isinstance(model.get_classifier(), torch.nn.Linear) and model.get_classifier().out_features == 3
    lpft = run_transfer(model, folders(dataset, model), 'lpft', tmp_path / 'lpft', epochs=1, lr=1e-5, batch_size=12,
                        workers=0, cs=[1e-2, 1e2])
    assert 0 < lpft['id_distortion'] and 0 < lpft['ood_distortion']


class _Interrupt(Exception):
    pass


class _StopsInEpoch:
    """A loader that raises in its ``epoch``-th pass, standing in for a killed run."""

    def __init__(self, loader, epoch: int):
        self.loader, self.epoch, self.passes = loader, epoch, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        if self.passes == self.epoch:
            raise _Interrupt
        return iter(self.loader)


def test_resume_after_interruption_matches_uninterrupted_run(dataset, tmp_path):
    def setup():
        model = small_resnet()
        data = folders(dataset, model, ood=False)
        model.reset_classifier(3)
        loader = torch.utils.data.DataLoader(data.train, batch_size=8)
        return model, loader, torch.utils.data.DataLoader(data.val, batch_size=12)

    model, train, val = setup()
    full = fine_tune(model, train, val, epochs=2, lr=0.01, device=torch.device('cpu'), out_dir=tmp_path / 'full')
    reference = model.state_dict()

    model, train, val = setup()
    with pytest.raises(_Interrupt):
        fine_tune(model, _StopsInEpoch(train, 2), val, 2, 0.01, torch.device('cpu'), tmp_path / 'cut')
    model, train, val = setup()
    resumed = fine_tune(model, train, val, 2, 0.01, torch.device('cpu'), tmp_path / 'cut', resume=True)
    assert resumed == full
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key])


def test_cli_finetune_linear_probe(dataset, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['finetune', '--model', 'resnet18', '--data', str(dataset / 'data'), '--ood', str(dataset / 'ood'),
                    '--mode', 'lp', '--img-size', '32', '--workers', '0', '--out', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['mode'] == 'lp' and results['classes'] == ['class_0', 'class_1', 'class_2']
    assert 0 <= results['ood_accuracy'] <= 1 and len(results['linear_probe']['sweep']) == 50
    assert 'lp: ID accuracy' in capsys.readouterr().out


def test_dataset_errors(dataset, tmp_path):
    model = small_resnet()
    with pytest.raises(FileNotFoundError, match='dataset folder not found'):
        folders(tmp_path / 'nothing', model)
    (tmp_path / 'half' / 'data' / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='incomplete dataset .*no val folder'):
        folders(tmp_path / 'half', model)
    write_split(tmp_path / 'odd' / 'data' / 'train', 1, seed=0)
    write_split(tmp_path / 'odd' / 'data' / 'val', 1, seed=0)
    (tmp_path / 'odd' / 'data' / 'val' / 'class_9').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'odd' / 'data' / 'val' / 'class_9' / 'x.png')
    with pytest.raises(ValueError, match='classes missing from the training split: class_9'):
        folders(tmp_path / 'odd', model, ood=False)
    (tmp_path / 'one' / 'data' / 'val').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save((tmp_path / 'half' / 'data' / 'train' / 'a' / 'x.png'))
    (tmp_path / 'half' / 'data' / 'train').rename(tmp_path / 'one' / 'data' / 'train')
    with pytest.raises(ValueError, match='at least two class folders'):
        folders(tmp_path / 'one', model, ood=False)
    with pytest.raises(ValueError, match="unknown mode 'lpx'"):
        run_transfer(model, folders(dataset, model), 'lpx', tmp_path / 'x')
