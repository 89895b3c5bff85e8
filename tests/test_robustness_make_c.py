"""make-c: layout, JPEG encoding, all 19 corruptions, seed reproducibility, resume."""
import json

import numpy as np
import pytest
from PIL import Image

from fan.cli import main
from fan.robustness.corrupt import cell_seed, corrupt_image, make_imagenet_c
from fan.robustness.metrics import ALL_CORRUPTIONS

SIZE = 32


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'src'
    (root / 'n01440764').mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / 'n01440764' / 'a.png')
    Image.fromarray(rng.integers(0, 256, (60, 40, 3), dtype=np.uint8)).save(root / 'top.jpg')
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*.JPEG'))}


def test_all_19_corruptions_layout_and_reproducibility(source, tmp_path):
    first = make_imagenet_c(source, tmp_path / 'c1', severities=[1, 5], seed=3, size=SIZE)
    assert first['files_written'] == 2 * 19 * 2 and first['failed'] == []
    files = _files(tmp_path / 'c1')
    assert set(files) == {f'{c}/{s}/{name}' for c in ALL_CORRUPTIONS for s in (1, 5)
                          for name in ('n01440764/a.JPEG', 'top.JPEG')}
    with Image.open(tmp_path / 'c1' / 'fog' / '5' / 'n01440764' / 'a.JPEG') as image:
        assert image.format == 'JPEG' and image.size == (SIZE, SIZE)
    manifest = json.loads((tmp_path / 'c1' / 'make_c.json').read_text())
    assert manifest['jpeg_quality'] == 85 and manifest['seed'] == 3 and 'generated' in manifest['generator']
    # same seed -> identical bytes, for every corruption including impulse_noise and glass_blur
    make_imagenet_c(source, tmp_path / 'c2', severities=[1, 5], seed=3, size=SIZE)
    assert _files(tmp_path / 'c2') == files
    # another seed changes the random corruptions
    make_imagenet_c(source, tmp_path / 'c3', ['gaussian_noise', 'impulse_noise', 'glass_blur'], [5], seed=4,
                    size=SIZE)
    for corruption in ('gaussian_noise', 'impulse_noise', 'glass_blur'):
        assert files[f'{corruption}/5/top.JPEG'] != (tmp_path / 'c3' / corruption / '5' / 'top.JPEG').read_bytes()


def test_corrupt_image_is_seeded_and_leaves_global_rng_alone():
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    for corruption in ('impulse_noise', 'glass_blur', 'frost', 'snow'):
        a = corrupt_image(image, corruption, 3, seed=7)
        b = corrupt_image(image, corruption, 3, seed=7)
        assert a.shape == image.shape and a.dtype == np.uint8
        assert np.array_equal(a, b), corruption
    assert np.random.rand() == expected_next  # the caller's numpy RNG stream is untouched
    assert cell_seed(0, 'fog', 1, 'x/a.JPEG') != cell_seed(0, 'fog', 1, 'x/b.JPEG') != cell_seed(1, 'fog', 1, 'x/a.JPEG')


def test_resume_parallel_and_bad_input(source, tmp_path, capsys):
    dst = tmp_path / 'c'
    (source / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    args = ['make-c', '--data', str(source), '--out', str(dst), '--size', str(SIZE), '--seed', '5',
            '--corruptions', 'shot_noise', 'frost', '--severities', '2', '3']
    assert main(args + ['--workers', '2']) == 0
    out = capsys.readouterr().out
    assert '8 files written' in out and '1 images failed' in out and 'broken.jpg' in out
    sequential = tmp_path / 'sequential'
    make_imagenet_c(source, sequential, ['shot_noise', 'frost'], [2, 3], seed=5, size=SIZE, workers=1)
    assert _files(sequential) == _files(dst)  # worker count does not change the output
    removed = dst / 'frost' / '3' / 'top.JPEG'
    removed.unlink()
    assert main(args + ['--workers', '1']) == 0
    assert '1 files written, 7 already there' in capsys.readouterr().out
    assert removed.read_bytes() == (sequential / 'frost' / '3' / 'top.JPEG').read_bytes()
    assert main(args + ['--workers', '1', '--force']) == 0
    assert '8 files written, 0 already there' in capsys.readouterr().out
    assert main(args + ['--workers', '1', '--size', '48']) == 2  # would mix two settings in one folder
    assert 'seed 5 and size 32' in capsys.readouterr().err
    assert main(['make-c', '--data', str(tmp_path / 'none'), '--out', str(dst)]) == 2
    assert 'source image folder not found' in capsys.readouterr().err
