"""Bad input on every command: one ``fan <cmd>: error:`` line naming the value or the file, exit status 2, before any
long work, no traceback; and the inputs that should work (16-bit images, folders) give right results."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fan.cli import main
from fan.io import read_image, to_rgb

VIT = 'fan_tiny_12_p16_224'


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (8-bit RGB) with one tiny compressed row of data: a
    decompression bomb to PIL, which refuses it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)

    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 4))
                     + chunk(b'IEND', b''))
    return path


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad-input')
    (root / 'a_file').write_text('not a folder')
    png_claiming(root / 'bomb.png', 60000, 60000)
    (root / 'not_an_image.jpg').write_bytes(b'this is text')
    unreadable = root / 'unreadable'
    unreadable.mkdir()
    (unreadable / 'x.jpg').write_bytes(b'garbage')
    png_claiming(unreadable / 'y.png', 60000, 60000)
    classes = root / 'classes' / 'n01440764'  # an ImageNet class folder whose only image is unreadable
    classes.mkdir(parents=True)
    (classes / 'x.JPEG').write_bytes(b'garbage')
    photos = root / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f'{i}.png')
    (photos / 'broken.jpg').write_bytes(b'garbage')
    return root


# (arguments, the message the error line must contain); {root} is the fixture's folder
CASES = [
    (['predict', '-b', '0'], 'argument -b/--batch-size: must be at least 1, got 0'),
    (['predict', '-b', '-1'], 'argument -b/--batch-size: must be at least 1, got -1'),
    (['predict', '-b', 'many'], "argument -b/--batch-size: 'many' is not an int"),
    (['predict', '--img-size', '0'], 'argument --img-size: must be at least 1, got 0'),
    (['predict', '--img-size', '-5'], 'argument --img-size: must be at least 1, got -5'),
    (['predict', '--img-size', '33'], 'img_size (33, 33) is not a multiple of the stem stride 16'),
    (['predict', '--num-classes', '0'], 'argument --num-classes: must be at least 1, got 0'),
    (['predict', '--top-k', '0'], 'argument --top-k: must be at least 1, got 0'),
    (['predict', '--out', '{root}/a_file'], 'argument --out: {root}/a_file is a file, not a folder'),
    (['predict', '--out', '{root}/a_file/below'], 'lies below {root}/a_file, which is a file'),
    (['predict', '{root}/bomb.png'], 'none of the 1 image file(s) could be read'),
    (['predict', '{root}/unreadable'], 'none of the 2 image file(s) could be read'),
    (['predict', '{root}/no_such_file.jpg'], 'image path does not exist: {root}/no_such_file.jpg'),
    (['predict', '--model', 'fan_tiny_12_p16_2244'], "unknown model 'fan_tiny_12_p16_2244'"),
    (['eval', '--model', VIT, '--data', '{root}', '--std', '0', '0', '0'], 'argument --std: must be a nonzero number'),
    (['eval', '--model', VIT, '--data', '{root}', '-j', '-1'], 'argument -j/--workers: must be 0 or more, got -1'),
    (['eval', '--model', VIT, '--data', '{root}', '--crop-pct', '0'], 'argument --crop-pct: must be a positive'),
    (['eval-c', '--model', VIT, '--data', '{root}', '-b', '0'], 'argument -b/--batch-size: must be at least 1'),
    (['make-c', '--data', '{root}', '--size', '-1'], 'argument --size: must be 0 or more, got -1'),
    (['make-c', '--data', '{root}/classes', '--corruptions', 'fog', '--severities', '1', '-j', '0'],
     'no image in {root}/classes could be read or corrupted'),
    (['eval', '--model', VIT, '--data', '{root}/classes', '-j', '0'], 'no readable image in {root}/classes'),
    (['train', '--model', VIT, '--data', '{root}', '--epochs', '0'], 'argument --epochs: must be at least 1, got 0'),
    (['train', '--model', VIT, '--data', '{root}', '--lr', '-1'], 'argument --lr: must be a positive number'),
    (['train', '--model', VIT, '--data', '{root}', '--lr', 'nan'], 'argument --lr: must be a positive number'),
    (['train', '--model', VIT, '--data', '{root}', '--opt', 'foo'], "argument --opt: unknown optimizer 'foo'"),
    (['train', '--model', VIT, '--data', '{root}', '--sched', 'foo'], "argument --sched: invalid choice: 'foo'"),
    (['train', '--model', VIT, '--data', '{root}', '--drop-path', '1.5'], 'argument --drop-path: must be between 0'),
    (['train', '--model', VIT, '--data', '{root}', '--model-kwargs', 'depth=abc'], f'cannot build {VIT}'),
    (['ood', '--model', VIT, '--data', '{root}', '--ood', '{root}', '--percentile', '101'],
     'argument --percentile: must be between 0 and 100, got 101'),
    (['spectrum', '--model', VIT, '--data', '{root}', '--max-k', '0'], 'argument --max-k: must be at least 1'),
    (['finetune', '--model', VIT, '--data', '{root}', '--epochs', '0'], 'argument --epochs: must be at least 1'),
    (['export', '--model', VIT, '--opset', '0'], 'argument --opset: must be at least 1, got 0'),
    (['bench', '-b', '0'], 'argument -b/--batch-size: must be at least 1, got 0'),
    (['bench', '--warmup', '-1'], 'argument --warmup: must be 0 or more, got -1'),
]


def run(argv, capsys):
    """``fan ARGV`` in this process: (exit status, stderr)."""
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's refusal
        status = stop.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize('argv, message', CASES, ids=[' '.join(a) for a, _ in CASES])
def test_bad_input_gets_one_error_line_and_status_2(argv, message, files, capsys, tmp_path):
    root = str(files)
    argv = [a.format(root=root) for a in argv]
    if '--out' not in argv and argv[0] != 'bench':
        argv += ['--out', str(tmp_path / 'out')]
    status, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f'fan {argv[0]}: error:')]
    assert status == 2, err
    assert len(errors) == 1 and message.format(root=root) in errors[0], err
    assert 'Traceback' not in err
    assert not list(tmp_path.rglob('*.tmp'))  # no file left half-written


def test_predict_classifies_every_image_of_a_folder_and_names_the_unreadable_one(files, capsys, tmp_path):
    out = tmp_path / 'out'
    status, err = run(['predict', str(files / 'photos'), '--num-classes', '10', '--out', str(out)], capsys)
    assert status == 0, err
    assert 'fan predict: skipped: cannot read image' in err and 'broken.jpg' in err
    predictions = json.loads((out / 'predictions.json').read_text())['predictions']
    assert sorted(Path(p['image']).name for p in predictions) == ['0.png', '1.png', '2.png']


def test_images_of_every_mode_become_rgb_without_saturating(tmp_path):
    """16-bit greyscale is scaled from 0-65535 (PIL's own conversion clips it to 255), float from 0-1; greyscale,
    palette, alpha and CMYK images convert as timm's loaders convert them."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / 'deep.png'
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith('I')
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    np.testing.assert_allclose(rgb[..., 0], ramp / 257, atol=0.51)
    assert (rgb == 255).mean() < 0.01  # (PIL's convert('RGB') saturates 99.75 % of a ramp's pixels)
    floats = Image.fromarray(np.linspace(0, 1, 16).reshape(4, 4).astype(np.float32), mode='F')
    np.testing.assert_allclose(np.asarray(to_rgb(floats))[..., 0], np.linspace(0, 255, 16).reshape(4, 4), atol=0.51)
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for mode in ('L', 'P', 'RGBA', 'LA', 'CMYK'):
        image = colour.convert(mode)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert('RGB'))), mode
