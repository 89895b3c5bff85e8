"""Fashion-MNIST the ecosystem's way: IDX files laid out for torchvision's reader (timm's torch/fashion_mnist), found
in --data or Debian's package, fan train on its greyscale images (3-channel and 1-channel models), and the shipped
weights of the FAN micro models on the real test set (fan eval, the demo)."""
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_transform

import fan.data.fashion_mnist as fashion_mnist
from fan import resolve_data_config
from fan.cli import main
from fan.errors import MissingPathError
from fan.zoo import demo_fashion_mnist, shipped_fashion_mnist_models

ROOT = Path(__file__).resolve().parents[1]


def write_idx(folder, prefix, images, labels, gzipped=True):
    """Images (N, 28, 28) uint8 and labels (N,) as the IDX files of Fashion-MNIST (big-endian headers)."""
    opener = gzip.open if gzipped else open
    suffix = '.gz' if gzipped else ''
    with opener(folder / f'{prefix}-images-idx3-ubyte{suffix}', 'wb') as file:
        file.write(struct.pack('>IIII', 2051, *images.shape) + images.tobytes())
    with opener(folder / f'{prefix}-labels-idx1-ubyte{suffix}', 'wb') as file:
        file.write(struct.pack('>II', 2049, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def idx_folder(tmp_path_factory):
    """24 training and 8 test images of two classes (bright top half / bright bottom half), gzipped as Debian ships
    them."""
    folder = tmp_path_factory.mktemp('fashion')
    rng = np.random.default_rng(0)
    for prefix, count in (('train', 24), ('t10k', 8)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            image[(slice(0, 14) if label else slice(14, 28))] += 180
        write_idx(folder, prefix, images, labels)
    return folder


def test_idx_files_are_laid_out_for_torchvisions_reader(idx_folder, monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path / 'no-package')
    root = fashion_mnist.fashion_mnist_root(idx_folder)
    raw = root / 'FashionMNIST' / 'raw'
    assert root == idx_folder and all((raw / name).is_file() for name in fashion_mnist.IDX_FILES)
    train = create_dataset('torch/fashion_mnist', root=str(root), split='train')
    test = create_dataset('torch/fashion_mnist', root=str(root), split='validation')
    image, label = train[1]
    assert (len(train), len(test), image.mode, image.size, label) == (24, 8, 'L', (28, 28), 1)
    assert fashion_mnist.fashion_mnist_root(root) == root  # (now in the reader's layout)
    with pytest.raises(MissingPathError, match='apt-get install dataset-fashion-mnist'):
        fashion_mnist.fashion_mnist_root(tmp_path / 'empty')


@pytest.mark.parametrize('channels', [3, 1])
def test_train_on_the_greyscale_images(idx_folder, tmp_path, channels, capsys):
    """fan train --dataset torch/fashion_mnist: the greyscale images converted to the model's channels, normalised
    with the dataset's statistics; an epoch trains and evaluates."""
    out = tmp_path / 'out'
    kwargs = ['depth=1'] + (['in_chans=1'] if channels == 1 else [])
    assert main(['train', '--model', 'fan_tiny_12_p16_224', '--model-kwargs', *kwargs, '--dataset',
                 'torch/fashion_mnist', '--data', str(idx_folder), '--img-size', '32', '--recipe', 'none',
                 '--epochs', '1', '-b', '8', '-j', '0', '--device', 'cpu', '--out', str(out)]) == 0, \
        capsys.readouterr().err
    assert (out / 'last.pth.tar').is_file() and (out / 'summary.csv').read_text().count('\n') == 2


MICRO_MODELS = ('fan_micro_2_p4_28', 'fan_micro_3_p8_hybrid_32', 'fan_swin_micro_patch4_window4_32')


def _real_test_set():
    """The real Fashion-MNIST test set (Debian's package); CI installs it, elsewhere the tests skip without it."""
    if not fashion_mnist.DEBIAN_DIR.is_dir():
        if os.environ.get('CI'):
            pytest.fail(f'CI runs with Debian\'s dataset-fashion-mnist installed, but {fashion_mnist.DEBIAN_DIR} '
                        'is missing')
        pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
    return fashion_mnist.load_fashion_mnist()


@pytest.mark.parametrize('arch', MICRO_MODELS)
def test_shipped_weights_reach_the_accuracy_their_card_states(arch):
    """timm.create_model(NAME.fashion_mnist, pretrained=True) loads the shipped float16 weights offline; with the
    model's own data config (timm's eval transform on the PIL images) they score on the 10,000 real test images
    what the card states."""
    data = _real_test_set()
    card = json.loads((ROOT / 'models' / f'{arch}.json').read_text())
    stated = next(w for w in card['weights'] if w['tag'] == 'fashion_mnist')['trained']['test_top1']
    assert stated >= 0.90  # the bar every shipped FAN micro model clears
    model = timm.create_model(f'{arch}.fashion_mnist', pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data.test_images), 1000):
            batch = torch.stack([transform(Image.fromarray(image.numpy(), 'L'))
                                 for image in data.test_images[start:start + 1000]])
            correct += (model(batch).argmax(-1) == data.test_labels[start:start + 1000]).sum().item()
    assert correct / len(data.test_images) == pytest.approx(stated, abs=5e-4)


def test_fan_eval_agrees_with_the_card_and_the_demo_shows_real_predictions(tmp_path, capsys, monkeypatch):
    """fan eval --dataset torch/fashion_mnist gives the best shipped model's card figure; the demo step uses those
    weights on the real test set, and on the ten bundled test images when the dataset is missing."""
    _real_test_set()
    best = shipped_fashion_mnist_models()[0]
    card = json.loads((ROOT / 'models' / f'{best}.json').read_text())
    stated = next(w for w in card['weights'] if w['tag'] == 'fashion_mnist')['trained']['test_top1']
    assert main(['eval', '--model', f'{best}.fashion_mnist', '--pretrained', '--dataset', 'torch/fashion_mnist',
                 '-j', '0', '--out', str(tmp_path / 'eval')]) == 0
    results = json.loads((tmp_path / 'eval' / 'torch_fashion_mnist.json').read_text())
    assert (results['images'], results['classes']) == (10000, 10)
    assert results['top1'] / 100 == pytest.approx(stated, abs=5e-4)
    demo_fashion_mnist(tmp_path / 'demo')
    out = capsys.readouterr().out
    assert f'{best}.fashion_mnist: weights trained by this project' in out and 'the 10,000 Fashion-MNIST' in out
    shown = json.loads((tmp_path / 'demo' / 'fashion_mnist_predictions.json').read_text())
    assert shown['top1'] == pytest.approx(stated, abs=5e-4)

    # predict: the bundled RGB photos reach the 1-channel model as greyscale; Fashion-MNIST's class names
    assert main(['predict', '--model', f'{best}.fashion_mnist', '--pretrained', '--top-k', '2',
                 '--out', str(tmp_path / 'predict')]) == 0
    predicted = json.loads((tmp_path / 'predict' / 'predictions.json').read_text())['predictions']
    assert len(predicted) == 6 and all(t['label'] in fashion_mnist.CLASSES for p in predicted for t in p['top'])

    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path / 'not-installed')
    demo_fashion_mnist(tmp_path / 'demo')
    out = capsys.readouterr().out
    assert 'the ten Fashion-MNIST test images that ship with the package' in out
    shown = json.loads((tmp_path / 'demo' / 'fashion_mnist_predictions.json').read_text())
    assert len(shown['predictions']) == 10 and {p['true_label'] for p in shown['predictions']} == set(
        fashion_mnist.CLASSES)
