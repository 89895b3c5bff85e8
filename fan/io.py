"""Reading the user's files and writing results: one atomic writer for every command, images read with clear errors.

Results are written to a temporary file beside the target and renamed over it, so an interrupted run leaves either
the previous complete file or the new one, never half of one.
"""
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

from PIL import Image, UnidentifiedImageError
from timm.data import get_img_extensions

from .errors import MissingPathError, UserError

__all__ = ['write_atomic', 'write_json', 'write_csv', 'save_torch', 'ImageMode', 'to_rgb', 'read_image', 'read_images',
           'readable_images', 'image_files', 'find_images']

PathLike = Union[str, os.PathLike]


def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder (created if needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'.{path.name}.tmp')
    with open(temporary, 'wb') as file:
        file.write(data if isinstance(data, bytes) else data.encode())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


def write_json(path: PathLike, document: Any, indent: int = 2) -> Path:
    """``document`` as JSON (tuples as lists, paths as strings), atomically."""
    return write_atomic(path, json.dumps(document, indent=indent, default=str) + '\n')


def write_csv(path: PathLike, rows: Iterable[Dict[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as CSV with these columns (other keys ignored, missing ones empty), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(path, text.getvalue())


def save_torch(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints: an interrupted save keeps the previous file)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'.{path.name}.tmp')
    with open(temporary, 'wb') as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


# what PIL raises for files it cannot decode: not an image, truncated, corrupt, or a decompression bomb (a header
# claiming more pixels than PIL's limit, which would exhaust the memory)
_UNREADABLE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """An image in any PIL mode as 8-bit RGB, the way timm's loaders convert (``convert('RGB')``: greyscale
    replicated, palettes looked up, alpha and CMYK dropped) except for high-bit-depth modes, which PIL would clip to
    255: 16-bit greyscale (``I;16*``, 0-65535) is scaled to 0-255, 32-bit integer (``I``) too when its values pass
    255, and float (``F``) from 0-1 when its values lie there."""
    if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        if image.mode.startswith('I;16') or (image.mode == 'I' and peak > 255):
            values = values * (255 / 65535)
        elif image.mode == 'F' and peak <= 1:
            values = values * 255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode='L')
    return image.convert('RGB')


class ImageMode:
    """A transform: a PIL image in ``mode`` (a picklable callable, for loader worker processes)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @classmethod
    def for_channels(cls, channels: int) -> 'ImageMode':
        """The mode of a model's input: L for a 1-channel model, else RGB."""
        return cls('L' if channels == 1 else 'RGB')

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


def read_image(path: PathLike) -> Image.Image:
    """An image file as RGB (``to_rgb``); a missing, unreadable, truncated or oversized (decompression bomb) file is
    a :class:`UserError` that names it."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f'image not found: {path}')
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except _UNREADABLE_ERRORS as error:
        raise UserError(f'cannot read image {path}: {error}') from None


def image_files(paths: Sequence[PathLike]) -> List[Path]:
    """Image files named by ``paths``: files as given, folders searched recursively (sorted)."""
    files: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += find_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise MissingPathError(f'image path does not exist: {path}')
    return files


def readable_images(files: Sequence[PathLike], command: str) -> List[Path]:
    """The files of ``files`` whose header PIL reads and whose data it verifies, without keeping the pixels (for
    datasets decoded later, in loader workers); each other one is skipped with a line on stderr, as in
    :func:`read_images`. None readable is a :class:`UserError`."""
    readable = []
    for file in map(Path, files):
        try:
            with Image.open(file) as image:
                image.verify()
            readable.append(file)
        except _UNREADABLE_ERRORS as error:
            print(f'fan {command}: skipped: cannot read image {file}: {error}', file=sys.stderr)
    if not readable:
        raise _nothing_readable(files)
    return readable


def read_images(files: Sequence[PathLike], command: str) -> List[Tuple[Path, Image.Image]]:
    """(path, RGB image) for every readable file of ``files``; each unreadable one is skipped with a line on stderr
    (``fan COMMAND: skipped: ...``), as eval and make-c skip them. None readable is a :class:`UserError`."""
    images = []
    for file in map(Path, files):
        try:
            images.append((file, read_image(file)))
        except UserError as error:
            print(f'fan {command}: skipped: {error}', file=sys.stderr)
    if not images:
        raise _nothing_readable(files)
    return images


def _nothing_readable(files: Sequence[PathLike]) -> UserError:
    return UserError(f'none of the {len(files)} image file(s) could be read ({", ".join(map(str, files[:3]))}'
                     f'{", ..." if len(files) > 3 else ""})')


def find_images(folder: PathLike) -> List[Path]:
    """Every image file below ``folder`` (recursively, sorted, by timm's image extensions)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingPathError(f'image folder not found: {folder}')
    extensions = get_img_extensions(as_set=True)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise MissingPathError(f'no images ({", ".join(sorted(extensions))}) under {folder}')
    return files
