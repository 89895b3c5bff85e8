"""Fashion-MNIST the ecosystem's way: IDX files laid out for torchvision's reader (timm's torch/fashion_mnist), found
in --data or Debian's package, and fan train on its greyscale images (3-channel and 1-channel models)."""
import gzip
import struct

import numpy as np
import pytest
from timm.data import create_dataset

import fan.data.fashion_mnist as fashion_mnist
from fan.cli import main
from fan.errors import MissingPathError


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
