"""``fan demo`` step: a small ImageNet-C from the bundled photos, evaluated with a FAN model."""
from pathlib import Path

import torch

from fan.data import bundled_photos

from .driver import run_imagenet_c
from .corrupt import make_imagenet_c
from .evaluate import ModelSpec
from .metrics import SEVERITIES

DEMO_MODEL = 'fan_tiny_12_p16_224'
# One standard corruption per family (noise, blur, weather, digital) at all 5 severities, so CE is defined for
# these four and mCE is reported as incomplete. Kept small for a CPU: 6 photos x 20 cells + 6 clean images.
DEMO_CORRUPTIONS = ('gaussian_noise', 'defocus_blur', 'snow', 'jpeg_compression')


def demo_imagenet_c(out_dir: Path) -> None:
    """Write out_dir/robustness/{clean, imagenet-c, imagenet_c.json/.md/.png} and print the table."""
    root = out_dir / 'robustness'
    photos = bundled_photos()
    for photo in photos:
        (root / 'clean' / photo.wnid).mkdir(parents=True, exist_ok=True)
        photo.image.save(root / 'clean' / photo.wnid / f'{photo.name}.png')
    print(f'make-c: {len(photos)} bundled photos ({", ".join(p.name for p in photos)}) x '
          f'{len(DEMO_CORRUPTIONS)} corruptions ({", ".join(DEMO_CORRUPTIONS)}) x 5 severities, seed 0')
    make_imagenet_c(root / 'clean', root / 'imagenet-c', DEMO_CORRUPTIONS, SEVERITIES, seed=0)
    print(f'eval-c: {DEMO_MODEL} with RANDOM weights (seed 0; no checkpoint in the demo): the numbers are not '
          'meaningful, the step shows the pipeline works. With real weights: fan eval-c --model '
          f'{DEMO_MODEL} --pretrained --data {root / "imagenet-c"} --clean {root / "clean"} --out DIR')
    torch.manual_seed(0)
    run_imagenet_c(ModelSpec(DEMO_MODEL, protocol='as-stored'), root / 'imagenet-c', root, clean=root / 'clean',
                   corruptions=DEMO_CORRUPTIONS, force=True, batch_size=16, workers=0, device='cpu')
    print((root / 'imagenet_c.md').read_text())
    print(f'written: {root}/imagenet_c.json, imagenet_c.md, imagenet_c.png')
