"""``make-c``: an ImageNet-C-layout copy of any image folder, reproducible from a seed.

Follows the ImageNet-C recipe (Hendrycks & Dietterich): resize the shorter side to 256 and centre-crop 224
(``size=224``; ``size=0`` keeps the image as it is), corrupt, save as JPEG quality 85 with ``optimize=True``,
into ``dst/<corruption>/<severity>/<relative path>.JPEG``. Corruptions come from the maintained
``imagecorruptions-imaug`` fork (import name ``imagecorruptions``), which runs all 19 on numpy 2.

Generated images approximate ImageNet-C; they are never bit-identical to the released files (different RNG
streams, motion blur without ImageMagick, JPEG re-encoding), so an mCE on them is an estimate.

Reproducibility: each (image, corruption, severity) gets its own seed derived from ``seed`` and the image's
relative path, so the output does not depend on the number of workers or the processing order. The package
draws from numpy's global RNG for 17 corruptions (seeded here, then restored) and takes ``seed=`` for
``impulse_noise`` and ``glass_blur``.
"""
import hashlib
import io
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from .data import is_image_file, load_rgb
from .metrics import ALL_CORRUPTIONS, SEVERITIES
from ..errors import MissingPathError, UserError, require_extra
from ..io import write_atomic, write_json

__all__ = ['CorruptionNotApplicable', 'cell_seed', 'corrupt_image', 'imagenet_c_crop', 'make_imagenet_c',
           'MANIFEST_NAME']

JPEG_QUALITY = 85  # what ImageNet-C was saved with (PIL, optimize=True)
RESIZE_RATIO = 256 / 224  # ImageNet-C: Resize(256) then CenterCrop(224)
MIN_SIDE = 32  # imagecorruptions refuses smaller images (corrupt_image calls its functions directly for them)
MANIFEST_NAME = 'make_c.json'
_SEED_ARGUMENT = ('impulse_noise', 'glass_blur')  # the two corruptions that ignore numpy's global seed


def cell_seed(seed: int, corruption: str, severity: int, relative_path: str) -> int:
    """A 32-bit seed for one image in one cell, stable across runs, machines and worker counts."""
    key = f'{seed}/{corruption}/{severity}/{relative_path}'.encode('utf-8')
    return int.from_bytes(hashlib.sha256(key).digest()[:4], 'little')


class CorruptionNotApplicable(UserError):
    """A corruption that cannot be applied to an image of this size (it fails, or changes the image's shape)."""


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt an H x W x 3 uint8 image; the same seed gives the same output.

    The package refuses images under 32 px; smaller ones (Fashion-MNIST's 28 px) go to the corruption function
    directly, and a corruption that fails on them or changes their shape raises :class:`CorruptionNotApplicable`.
    """
    # imported here: it loads numba, cv2 and skimage (slow), and comes with the robustness extra
    package = require_extra('imagecorruptions', 'robustness')
    if corruption not in ALL_CORRUPTIONS:
        raise UserError(f'unknown corruption {corruption!r}; known: {list(ALL_CORRUPTIONS)}')
    kwargs = {'seed': seed} if corruption in _SEED_ARGUMENT else {}
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        if min(image.shape[:2]) >= MIN_SIDE:
            return package.corrupt(image, corruption_name=corruption, severity=severity, **kwargs)
        try:
            corrupted = np.uint8(package.corruption_dict[corruption](Image.fromarray(image), severity, **kwargs))
        except Exception as error:  # the package's functions assume >= 32 px; any failure below that is the size
            raise CorruptionNotApplicable(
                f'{corruption} cannot apply at {image.shape[1]}x{image.shape[0]} px: {error}') from None
        if corrupted.shape != image.shape:
            raise CorruptionNotApplicable(f'{corruption} changes a {image.shape[1]}x{image.shape[0]} px image to '
                                          f'{corrupted.shape[1]}x{corrupted.shape[0]}')
        return corrupted
    finally:
        np.random.set_state(state)


def imagenet_c_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to size * 256/224 (bilinear) and centre-crop size x size, as ImageNet-C did."""
    return TF.center_crop(TF.resize(image, round(size * RESIZE_RATIO)), [size, size])


@dataclass(frozen=True)
class _ImageJob:
    source: Path
    relative: str  # output path below dst/<corruption>/<severity>/, with the .JPEG suffix
    dst: Path
    corruptions: Tuple[str, ...]
    severities: Tuple[int, ...]
    seed: int
    size: int
    force: bool


def _corrupt_one_image(job: _ImageJob) -> Tuple[int, int, Optional[str], Dict[str, str]]:
    """Write every cell of one image; returns (files written, files already there, error or None, the corruptions
    that cannot apply at this image's size with the reason)."""
    targets = [(c, s, job.dst / c / str(s) / job.relative) for c in job.corruptions for s in job.severities]
    todo = [t for t in targets if job.force or not t[2].exists()]
    if not todo:
        return 0, len(targets), None, {}
    try:
        image = load_rgb(job.source)
    except OSError as error:
        return 0, 0, str(error), {}
    if job.size:
        image = imagenet_c_crop(image, job.size)
    pixels = np.asarray(image)
    not_applicable: Dict[str, str] = {}
    written = 0
    for corruption, severity, target in todo:
        if corruption in not_applicable:
            continue
        try:
            corrupted = corrupt_image(pixels, corruption, severity, cell_seed(job.seed, corruption, severity,
                                                                               job.relative))
        except CorruptionNotApplicable as error:
            not_applicable[corruption] = str(error)
            continue
        encoded = io.BytesIO()
        Image.fromarray(corrupted).save(encoded, format='JPEG', quality=JPEG_QUALITY, optimize=True)
        write_atomic(target, encoded.getvalue())  # an interrupted run leaves no half-written JPEG
        written += 1
    return written, len(targets) - len(todo), None, not_applicable


def _end_with_parent() -> None:
    """Pool worker start-up: on Linux the worker gets SIGTERM when the process that started it dies (a killed
    ``fan make-c`` leaves no worker running); elsewhere nothing."""
    if sys.platform.startswith('linux'):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def make_imagenet_c(
        src: Path,
        dst: Path,
        corruptions: Sequence[str] = ALL_CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        seed: int = 0,
        size: int = 224,
        workers: int = 1,
        force: bool = False,
) -> Dict:
    """Write ``dst/<corruption>/<severity>/<path below src>.JPEG`` for every image below ``src``.

    Files that already exist are kept (an interrupted run resumes) unless ``force``. Unreadable source
    images are reported, not fatal. Returns the manifest, also written to ``dst/make_c.json``.
    """
    require_extra('imagecorruptions', 'robustness')  # before any work: say what to install
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MissingPathError(f'source image folder not found: {src}')
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    bad_severities = [s for s in severities if s not in SEVERITIES]
    if unknown or bad_severities:
        raise UserError(f'unknown corruption(s) {unknown} or severities {bad_severities}; '
                         f'corruptions: {list(ALL_CORRUPTIONS)}, severities: {list(SEVERITIES)}')
    sources = sorted(p for p in src.rglob('*') if is_image_file(p))
    if not sources:
        raise UserError(f'no images below {src}')
    relatives = [p.relative_to(src).with_suffix('.JPEG').as_posix() for p in sources]
    clashes = sorted(name for name, count in Counter(relatives).items() if count > 1)
    if clashes:
        raise UserError(f'several source images map to the same output name: {clashes[:5]}')
    manifest_path = dst / MANIFEST_NAME
    if manifest_path.exists() and not force:
        earlier = json.loads(manifest_path.read_text())
        if (earlier.get('seed'), earlier.get('size')) != (seed, size):
            raise UserError(f'{dst} was made with seed {earlier.get("seed")} and size {earlier.get("size")}; '
                             'use the same ones to resume, --force to rewrite, or another --out')
    jobs = [_ImageJob(path, relative, dst, tuple(corruptions), tuple(severities), seed, size, force)
            for path, relative in zip(sources, relatives)]
    if 'glass_blur' in corruptions and workers > 1:
        # compile glass_blur's numba kernel (seconds) once here; forked workers inherit it
        corrupt_image(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8), 'glass_blur', 1, seed=0)
    written = kept = 0
    failed: List[str] = []
    not_applicable: Dict[str, str] = {}  # corruption -> why (the first image it failed on)
    pool_kwargs = dict(max_workers=workers, initializer=_end_with_parent)
    with ProcessPoolExecutor(**pool_kwargs) if workers > 1 else nullcontext() as pool:
        outcomes = pool.map(_corrupt_one_image, jobs, chunksize=4) if pool else map(_corrupt_one_image, jobs)
        for n_written, n_kept, error, skipped in tqdm(outcomes, total=len(jobs), desc='make-c', unit='img'):
            written, kept = written + n_written, kept + n_kept
            if error:
                failed.append(error)
            for corruption, reason in skipped.items():
                not_applicable.setdefault(corruption, reason)
    manifest = dict(
        source=str(src.resolve()),
        generator=f'imagecorruptions-imaug {version("imagecorruptions-imaug")} (generated, not the released '
                  'ImageNet-C files)',
        seed=seed,
        size=size,
        jpeg_quality=JPEG_QUALITY,
        corruptions=list(corruptions),
        severities=list(severities),
        images=len(jobs),
        files_written=written,
        files_kept=kept,
        failed=failed,
        not_applicable=not_applicable,
    )
    write_json(manifest_path, manifest)
    return manifest
