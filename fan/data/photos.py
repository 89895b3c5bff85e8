"""Six real photos that ship inside the package, with their ImageNet-1k classes.

No dataset can be downloaded where the tests and the demo run, so both use these photos (JPEG, short side 256).
Sources, all free to redistribute: scikit-image's ``chelsea`` (Stefan van der Walt), ``coffee`` (Rachel Michetti) and
``rocket`` (NASA, public domain); scikit-learn's ``china.jpg`` and ``flower.jpg`` (Wikimedia Commons, CC BY 2.0);
matplotlib's ``grace_hopper.jpg`` (U.S. Navy, public domain). Each has the ImageNet-1k class a person would give it.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List

from PIL import Image

__all__ = ['BundledPhoto', 'bundled_photos', 'PHOTO_DIR']

PHOTO_DIR = Path(__file__).resolve().parent / 'photos'


@dataclass(frozen=True)
class BundledPhoto:
    name: str
    image: Image.Image  # RGB
    label: int  # ImageNet-1k class index (sorted-wnid order)
    wnid: str  # WordNet id of that class


# file stem, ImageNet-1k index, wnid
_PHOTOS = (
    ('chelsea', 281, 'n02123045'),  # tabby cat
    ('coffee', 967, 'n07920052'),  # espresso
    ('rocket', 657, 'n03773504'),  # missile
    ('china', 698, 'n03877845'),  # palace
    ('flower', 985, 'n11939491'),  # daisy
    ('grace_hopper', 652, 'n03763968'),  # military uniform
)


def bundled_photos() -> List[BundledPhoto]:
    """The six labelled photos, decoded as RGB."""
    return [BundledPhoto(name, Image.open(PHOTO_DIR / f'{name}.jpg').convert('RGB'), label, wnid)
            for name, label, wnid in _PHOTOS]
