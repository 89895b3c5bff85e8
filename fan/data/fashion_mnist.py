"""Fashion-MNIST, read the ecosystem's way: timm's ``torch/fashion_mnist`` dataset (torchvision's reader,
``download=False``) over the IDX files that Debian's ``dataset-fashion-mnist`` package installs (MIT licence).

torchvision's reader wants ``ROOT/FashionMNIST/raw/`` holding the four IDX files uncompressed; the package ships them
gzipped in ``/usr/share/datasets/fashion-mnist``. :func:`fashion_mnist_root` finds them and lays them out.
"""
import gzip
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from PIL import Image

from ..errors import MissingPathError

__all__ = ['DEBIAN_DIR', 'IDX_FILES', 'MEAN', 'STD', 'DATA_CONFIG', 'CLASSES', 'SAMPLE_DIR', 'FashionMnist',
           'fashion_mnist_root', 'load_fashion_mnist', 'bundled_samples']

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')  # apt-get install dataset-fashion-mnist
IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
MEAN, STD = (0.2860,), (0.3530,)  # of the 60,000 training images' pixels in [0, 1]
# the data config of a model for Fashion-MNIST (timm's pretrained-cfg fields): 28 px images are resized, not cropped
DATA_CONFIG = {'num_classes': 10, 'mean': MEAN, 'std': STD, 'interpolation': 'bilinear', 'crop_pct': 1.0}
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# the first test image of each class (MIT licence, like the dataset), for when the dataset is not installed
SAMPLE_DIR = Path(__file__).resolve().parent / 'fashion_mnist_samples'


def _cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'fan' / 'fashion_mnist'


def fashion_mnist_root(data: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A root for torchvision's ``FashionMNIST(root, download=False)``: ``ROOT/FashionMNIST/raw/`` with the four IDX
    files. Looked for in order: ``data`` already in that layout; the IDX files (gzipped or not) directly in ``data``
    or in ``data/FashionMNIST/raw``; Debian's package. Gzipped files are decompressed once into ``data`` (when it is
    writable) or into ``~/.cache/fan/fashion_mnist``. Nothing found is a :class:`MissingPathError` that names the
    package to install."""
    candidates = ([Path(data), Path(data) / 'FashionMNIST' / 'raw'] if data else []) + [DEBIAN_DIR]
    for folder in candidates:
        sources = [_idx_file(folder, name) for name in IDX_FILES]
        if not all(sources):
            continue
        root = folder.parent.parent if folder.name == 'raw' and folder.parent.name == 'FashionMNIST' else None
        if root is not None and all(s.suffix != '.gz' for s in sources):
            return root  # (already the reader's layout)
        target_root = Path(data) if data and folder != DEBIAN_DIR and os.access(data, os.W_OK) else _cache_dir()
        raw = target_root / 'FashionMNIST' / 'raw'
        raw.mkdir(parents=True, exist_ok=True)
        for source, name in zip(sources, IDX_FILES):
            if not (raw / name).is_file():
                _decompress(source, raw / name)
        return target_root
    where = f'{data} (nor {DEBIAN_DIR})' if data else str(DEBIAN_DIR)
    raise MissingPathError(f'Fashion-MNIST not found in {where}: apt-get install dataset-fashion-mnist, or give '
                           f'--data a folder with {", ".join(IDX_FILES)} (gzipped or not)')


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    for path in (folder / name, folder / f'{name}.gz'):
        if path.is_file():
            return path
    return None


def _decompress(source: Path, target: Path) -> None:
    """``source`` (gzipped or not) -> ``target``, through a temporary file (an interrupted copy leaves none)."""
    temporary = target.with_name(f'.{target.name}.tmp')
    opener = gzip.open if source.suffix == '.gz' else open
    with opener(source, 'rb') as src, open(temporary, 'wb') as dst:
        shutil.copyfileobj(src, dst)
    os.replace(temporary, target)


@dataclass
class FashionMnist:
    """The whole dataset in memory."""
    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    classes: List[str]


def load_fashion_mnist(data: Optional[Union[str, os.PathLike]] = None) -> FashionMnist:
    """Fashion-MNIST through timm's ``torch/fashion_mnist`` (torchvision's reader, no download; found by
    :func:`fashion_mnist_root`) as uint8 tensors."""
    from timm.data import create_dataset

    root = str(fashion_mnist_root(data))
    train, test = (create_dataset('torch/fashion_mnist', root=root, split=split, download=False)
                   for split in ('train', 'test'))
    return FashionMnist(train.data, train.targets, test.data, test.targets, list(train.classes))


def bundled_samples() -> List[Tuple[str, Image.Image, int]]:
    """The ten test images that ship with the package (one per class): (name, greyscale image, label)."""
    samples = []
    for path in sorted(SAMPLE_DIR.glob('test*_*.png')):
        image = Image.open(path)
        image.load()
        samples.append((path.name, image, int(path.stem.rsplit('_', 1)[1])))
    return samples
