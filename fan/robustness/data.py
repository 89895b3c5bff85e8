"""Datasets on disk: ImageNet-C layout, WordNet-id class folders, ImageNet-A/R class masks, safe image loading.

Class folders are WordNet ids (``n01440764``); labels are always indices into the standard 1000 ImageNet
classes (timm's ``ImageNetInfo`` order, i.e. sorted wnids), whichever subset of classes a folder holds.
"""
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageNetInfo
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import Dataset
from ..errors import MissingPathError, UserError
from ..io import read_image

__all__ = [
    'LabelledImage', 'LabelledImageDataset', 'imagenet_wnid_to_index', 'imagenet_subset_indices',
    'list_class_folders', 'find_imagenet_c_cells', 'load_rgb', 'is_image_file',
]

# The 200-class benchmarks: timm ships their 1000-class indices (ascending) as package data.
_SUBSET_INDEX_FILES = {
    'imagenet-a': '_info/imagenet_a_indices.txt',
    'imagenet-r': '_info/imagenet_r_indices.txt',
}
@dataclass(frozen=True)
class LabelledImage:
    path: Path  # the file (or, for an image held in memory, a name for messages)
    label: int  # class index (ImageNet-1k for ImageNet folders)
    image: Optional[Image.Image] = None  # the decoded image, for datasets read into memory (Fashion-MNIST)


def imagenet_wnid_to_index() -> Dict[str, int]:
    """WordNet id -> standard ImageNet-1k class index."""
    return {wnid: index for index, wnid in enumerate(ImageNetInfo().label_names())}


def imagenet_subset_indices(dataset: str) -> List[int]:
    """The ascending ImageNet-1k indices of the 200 classes of 'imagenet-a' or 'imagenet-r'."""
    if dataset not in _SUBSET_INDEX_FILES:
        raise UserError(f'no class subset for {dataset!r}; known: {sorted(_SUBSET_INDEX_FILES)}')
    text = pkgutil.get_data('timm.data', _SUBSET_INDEX_FILES[dataset]).decode('utf-8')
    return [int(line) for line in text.split()]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in get_img_extensions(as_set=True)


def list_class_folders(root: Path, allowed_labels: Optional[Sequence[int]] = None) -> List[LabelledImage]:
    """Images under ``root/<wnid>/``, sorted by path, labelled with their ImageNet-1k index.

    Any subset of the 1000 classes may be present. A folder that is not an ImageNet-1k wnid (or not one of
    ``allowed_labels``) is an error, as is a root with no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingPathError(f'image folder not found: {root}')
    wnid_to_index = imagenet_wnid_to_index()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in class_dirs if p.name not in wnid_to_index]
    if unknown:
        raise UserError(f'{root}: class folders must be ImageNet-1k WordNet ids (e.g. n01440764); '
                         f'not ImageNet-1k: {unknown[:10]}{" ..." if len(unknown) > 10 else ""}')
    if allowed_labels is not None:
        allowed = set(allowed_labels)
        outside = [p.name for p in class_dirs if wnid_to_index[p.name] not in allowed]
        if outside:
            raise UserError(f'{root}: classes outside the evaluated 200-class subset: {outside[:10]}')
    items = [
        LabelledImage(path, wnid_to_index[class_dir.name])
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob('*')) if is_image_file(path)
    ]
    if not items:
        raise UserError(f'{root}: no images found in <wnid>/ class folders '
                         f'(extensions {sorted(get_img_extensions(as_set=True))})')
    return items


def find_imagenet_c_cells(
        root: Path,
        corruptions: Sequence[str],
        severities: Sequence[int],
) -> Tuple[Dict[Tuple[str, int], Path], List[str]]:
    """Locate ``root/<corruption>/<severity>/`` folders.

    Returns:
        The folder of every requested cell that exists, and one message per missing corruption or severity
        folder saying what does exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingPathError(f'ImageNet-C folder not found: {root}')
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    cells, missing = {}, []
    for corruption in corruptions:
        corruption_dir = root / corruption
        if not corruption_dir.is_dir():
            missing.append(f'{corruption}: no folder {corruption_dir} (corruption folders present: '
                           f'{", ".join(present) or "none"})')
            continue
        for severity in severities:
            cell_dir = corruption_dir / str(severity)
            if cell_dir.is_dir():
                cells[(corruption, severity)] = cell_dir
            else:
                have = sorted(p.name for p in corruption_dir.iterdir() if p.is_dir())
                missing.append(f'{corruption}/{severity}: no folder {cell_dir} (severities present: '
                               f'{", ".join(have) or "none"})')
    return cells, missing


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully into RGB (``fan.io.read_image``); raises OSError (with the path) for unreadable,
    truncated or oversized files, which the evaluation and make-c skip and count."""
    try:
        return read_image(path)
    except UserError as error:
        raise OSError(str(error)) from None


class LabelledImageDataset(Dataset):
    """Items (transformed image, e.g. a C x H x W tensor, or None if unreadable; class index; error message)."""

    def __init__(self, items: Sequence[LabelledImage], transform: Callable[[Image.Image], torch.Tensor]):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, str]:
        item = self.items[index]
        try:
            return self.transform(item.image if item.image is not None else load_rgb(item.path)), item.label, ''
        except OSError as error:
            return None, item.label, str(error)
