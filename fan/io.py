"""Reading the user's files and writing results: one atomic writer for every command, images read with clear errors.

Results are written to a temporary file beside the target and renamed over it, so an interrupted run leaves either
the previous complete file or the new one, never half of one.
"""
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

from PIL import Image, UnidentifiedImageError
from timm.data import get_img_extensions

from .errors import MissingPathError, UserError

__all__ = ['write_atomic', 'write_json', 'write_csv', 'save_torch', 'read_image', 'find_images']

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


def read_image(path: PathLike) -> Image.Image:
    """An image file as RGB; a missing or unreadable file is a :class:`UserError` that names it."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f'image not found: {path}')
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UserError(f'cannot read image {path}: {error}') from None


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
