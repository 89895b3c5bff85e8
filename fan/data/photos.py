"""Real photos that ship inside installed packages, with their ImageNet-1k classes.

No dataset can be downloaded where the tests and the demo run, so the demo and the tests use the colour
photos that scikit-image, scikit-learn and matplotlib carry in their wheels. Each gets the ImageNet-1k
class a person would give it (index into the standard sorted-wnid order).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
from PIL import Image

__all__ = ['BundledPhoto', 'bundled_photos']


@dataclass(frozen=True)
class BundledPhoto:
    name: str
    image: Image.Image  # RGB
    label: int  # ImageNet-1k class index
    wnid: str  # WordNet id of that class


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        return getattr(skimage.data, name)()
    return load


def _sklearn(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image
        return load_sample_image(file)
    return load


def _matplotlib(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib
        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / 'sample_data' / file).convert('RGB'))
    return load


# name, loader, ImageNet-1k index, wnid
_PHOTOS: Tuple[Tuple[str, Callable[[], np.ndarray], int, str], ...] = (
    ('chelsea', _skimage('chelsea'), 281, 'n02123045'),  # tabby cat
    ('coffee', _skimage('coffee'), 967, 'n07920052'),  # espresso
    ('rocket', _skimage('rocket'), 657, 'n03773504'),  # missile
    ('china', _sklearn('china.jpg'), 698, 'n03877845'),  # palace
    ('flower', _sklearn('flower.jpg'), 985, 'n11939491'),  # daisy
    ('grace_hopper', _matplotlib('grace_hopper.jpg'), 652, 'n03763968'),  # military uniform
)


def bundled_photos() -> List[BundledPhoto]:
    """The labelled colour photos available on this machine (those whose package is installed)."""
    photos = []
    for name, load, label, wnid in _PHOTOS:
        try:
            array = load()
        except (ImportError, FileNotFoundError, OSError):
            continue
        photos.append(BundledPhoto(name, Image.fromarray(np.ascontiguousarray(array)).convert('RGB'), label, wnid))
    if not photos:
        raise RuntimeError('no bundled photos found: install scikit-image, scikit-learn or matplotlib')
    return photos
