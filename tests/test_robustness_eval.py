"""eval-c / eval end to end on a tiny synthetic ImageNet-C, checked against a naive per-image loop.

Class folders are chosen from the reference model's own predictions (two of every three images where the
prediction is right), so a wrong label mapping, sharding or count changes the numbers.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

import fan.robustness.driver as driver
from fan.cli import main
from fan.robustness.data import find_imagenet_c_cells, imagenet_subset_indices, list_class_folders

MODEL, IMG_SIZE = 'resnet18', 32
CELLS = ('clean', 'gaussian_noise/1', 'gaussian_noise/2', 'contrast/1', 'contrast/2')
IMAGES_PER_CELL = 5
BROKEN_CELL = 'gaussian_noise/2'
WNIDS = ImageNetInfo().label_names()


def _reference(checkpoint: Path):
    model = timm.create_model(MODEL, checkpoint_path=str(checkpoint)).eval()
    transform = create_transform(**resolve_model_data_config(model, args={'img_size': IMG_SIZE}))
    return model, transform


def _write_labelled_images(root: Path, model, transform, rng, class_subset=None):
    """Write noise images into <wnid>/ folders; return the naively computed [top-1, top-5] correct counts."""
    correct = np.zeros(2, dtype=int)
    for i in range(IMAGES_PER_CELL):
        image = Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8))
        with torch.no_grad():
            logits = model(transform(image)[None])[0]
        candidates = torch.arange(1000) if class_subset is None else torch.tensor(class_subset)
        ranked = candidates[logits[candidates].argsort(descending=True)]
        label = int(ranked[0]) if i % 3 else int(ranked[7])  # right, or wrong even at top-5
        correct += [label == ranked[0], label in ranked[:5]]
        (root / WNIDS[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / WNIDS[label] / f'img{i}.png')
    return correct


@pytest.fixture(scope='module')
def imagenet_c(tmp_path_factory):
    """A 2-corruption x 2-severity ImageNet-C with clean images, one truncated JPEG, and expected counts."""
    root = tmp_path_factory.mktemp('imagenet_c')
    torch.manual_seed(0)
    checkpoint = root / 'resnet18.pth'
    torch.save(timm.create_model(MODEL).state_dict(), checkpoint)
    model, transform = _reference(checkpoint)
    rng = np.random.default_rng(0)
    expected = {}
    for cell in CELLS:
        folder = root / 'clean' if cell == 'clean' else root / 'c' / cell
        expected[cell] = _write_labelled_images(folder, model, transform, rng)
    broken = root / 'c' / BROKEN_CELL / WNIDS[0] / 'broken.JPEG'
    broken.parent.mkdir(parents=True, exist_ok=True)
    buffer = root / 'whole.jpg'
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer)
    broken.write_bytes(buffer.read_bytes()[:200])  # header only: PIL fails while decoding
    return dict(root=root, checkpoint=checkpoint, expected=expected)


def _eval_c_args(data, out, *extra, corruptions=('gaussian_noise', 'contrast')):
    return ['eval-c', '--model', MODEL, '--checkpoint', str(data['checkpoint']), '--img-size', str(IMG_SIZE),
            '--data', str(data['root'] / 'c'), '--clean', str(data['root'] / 'clean'), '--out', str(out),
            '--severities', '1', '2', '--batch-size', '2', '--device', 'cpu', *extra,
            *(['--corruptions', *corruptions] if corruptions else [])]


def test_label_mapping_with_class_subset(tmp_path):
    for wnid in ('n02123045', 'n01440764'):  # tabby cat (281), tench (0): only 2 of the 1000 classes present
        (tmp_path / wnid).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / wnid / 'a.png')
    (tmp_path / 'n01440764' / 'notes.txt').write_text('not an image')
    items = list_class_folders(tmp_path)
    assert [(p.path.parent.name, p.label) for p in items] == [('n01440764', 0), ('n02123045', 281)]
    with pytest.raises(ValueError, match='outside'):
        list_class_folders(tmp_path, allowed_labels=imagenet_subset_indices('imagenet-a'))
    (tmp_path / 'cats').mkdir()
    with pytest.raises(ValueError, match='cats'):
        list_class_folders(tmp_path)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        list_class_folders(tmp_path / 'nowhere')


def test_subset_indices_are_timm_lists():
    a, r = imagenet_subset_indices('imagenet-a'), imagenet_subset_indices('imagenet-r')
    assert len(a) == len(r) == 200 and a == sorted(a) and r == sorted(r)
    assert a[:5] == [6, 11, 13, 15, 17] and r[:5] == [1, 2, 4, 6, 8]


def test_missing_folders_are_reported_with_what_exists(tmp_path):
    (tmp_path / 'fog' / '1').mkdir(parents=True)
    (tmp_path / 'fog' / '3').mkdir()
    cells, missing = find_imagenet_c_cells(tmp_path, ['fog', 'snow'], [1, 2])
    assert list(cells) == [('fog', 1)]
    assert any('fog/2' in m and 'severities present: 1, 3' in m for m in missing)
    assert any(m.startswith('snow') and 'present: fog' in m for m in missing)


def test_eval_c_matches_naive_loop(imagenet_c, tmp_path):
    out = tmp_path / 'res'
    assert main(_eval_c_args(imagenet_c, out, '--workers', '2', corruptions=None)) == 0
    results = json.loads((out / 'imagenet_c.json').read_text())
    assert results['protocol'] == 'as-stored'
    # by default the 15 standard corruptions are expected (13 reported missing), the extras only if present
    assert len(results['missing']) == 13 and any(m.startswith('fog:') for m in results['missing'])
    assert not any('spatter' in m for m in results['missing'])
    expected = imagenet_c['expected']
    assert results['model'] == MODEL and results['data_config']['input_size'] == [3, IMG_SIZE, IMG_SIZE]
    for cell in CELLS[1:]:
        corruption, severity = cell.split('/')
        assert results['error'][corruption][severity] == pytest.approx(100 * (1 - expected[cell][0] / 5))
        assert results['images'][corruption][severity] == IMAGES_PER_CELL
        assert results['cells'][cell]['top5_correct'] == expected[cell][1]
    assert results['clean_error'] == pytest.approx(100 * (1 - expected['clean'][0] / 5))
    assert results['clean_top5_error'] == pytest.approx(100 * (1 - expected['clean'][1] / 5))
    accuracies = [expected[cell][0] / 5 * 100 for cell in CELLS[1:]]
    assert results['mean_accuracy'] == pytest.approx(sum(accuracies) / 4)
    assert results['retention'] == pytest.approx(100 * results['mean_accuracy'] / results['clean_accuracy'])
    assert results['mce'] is None and 'fog' in results['incomplete']['mce']
    # the truncated JPEG is counted and reported, not fatal
    assert results['skipped_images'] == 1
    assert results['skipped'][0]['cell'] == BROKEN_CELL and 'broken.JPEG' in results['skipped'][0]['error']
    markdown = (out / 'imagenet_c.md').read_text()
    assert '| gaussian_noise |' in markdown and 'Incomplete aggregates' in markdown
    assert (out / 'imagenet_c.png').stat().st_size > 0


def test_resume_after_interrupted_run(imagenet_c, tmp_path, monkeypatch):
    reference_out = tmp_path / 'uninterrupted'
    assert main(_eval_c_args(imagenet_c, reference_out, '--workers', '0')) == 0
    real_evaluate_cells = driver.evaluate_cells
    evaluated = []

    def interrupted_after_two_cells(model, transform, cells, context, on_cell_done, **kwargs):
        def tracking(name, counts):
            on_cell_done(name, counts)
            evaluated.append(name)
            if len(evaluated) == 2:
                raise KeyboardInterrupt  # Ctrl-C once two cells are finished
        return real_evaluate_cells(model, transform, cells, context, tracking, **kwargs)

    out = tmp_path / 'res'
    monkeypatch.setattr(driver, 'evaluate_cells', interrupted_after_two_cells)
    assert main(_eval_c_args(imagenet_c, out, '--workers', '0')) == 130  # interrupted
    assert sorted(json.loads((out / 'imagenet_c.json').read_text())['cells']) == sorted(evaluated)
    assert len(evaluated) == 2 and not (out / 'imagenet_c.md').exists()

    requested = []

    def recording(model, transform, cells, context, on_cell_done, **kwargs):
        requested.append(list(cells))
        return real_evaluate_cells(model, transform, cells, context, on_cell_done, **kwargs)

    monkeypatch.setattr(driver, 'evaluate_cells', recording)
    assert main(_eval_c_args(imagenet_c, out, '--workers', '0')) == 0
    assert sorted(requested[0]) == sorted(set(CELLS) - set(evaluated))  # only the unfinished cells
    assert json.loads((out / 'imagenet_c.json').read_text()) == json.loads((reference_out / 'imagenet_c.json').read_text())
    assert main(_eval_c_args(imagenet_c, out, '--workers', '0', '--force')) == 0
    assert sorted(requested[1]) == sorted(CELLS)
    # other settings must not silently mix into the same file
    assert main(_eval_c_args(imagenet_c, out, '--workers', '0', '--crop-pct', '1.0')) == 2
    assert main(_eval_c_args(imagenet_c, out, '--workers', '0', '--precision', 'bf16')) == 2  # nor fp32 and bf16


def test_eval_imagenet_r_uses_the_200_class_mask(tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / 'vit.pth'
    torch.save(timm.create_model('vit_tiny_patch16_224', img_size=IMG_SIZE).state_dict(), checkpoint)
    model = timm.create_model('vit_tiny_patch16_224', img_size=IMG_SIZE, checkpoint_path=str(checkpoint)).eval()
    transform = create_transform(**resolve_model_data_config(model, args={'img_size': IMG_SIZE}))
    subset = imagenet_subset_indices('imagenet-r')
    correct = _write_labelled_images(tmp_path / 'r', model, transform, np.random.default_rng(2), subset)
    out = tmp_path / 'r'
    assert main(['eval', '--dataset', 'imagenet-r', '--data', str(tmp_path / 'r'), '--model',
                 'vit_tiny_patch16_224', '--img-size', str(IMG_SIZE), '--checkpoint', str(checkpoint),
                 '--out', str(out), '--workers', '0', '--device', 'cpu']) == 0
    results = json.loads((out / 'imagenet-r.json').read_text())
    assert results['top1'] == pytest.approx(100 * correct[0] / IMAGES_PER_CELL)
    assert results['top5'] == pytest.approx(100 * correct[1] / IMAGES_PER_CELL)
    assert results['images'] == IMAGES_PER_CELL and results['dataset'] == 'imagenet-r'


@pytest.mark.parametrize('name', ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid'])
def test_fan_models_evaluate_like_a_naive_loop(name, tmp_path):
    torch.manual_seed(2)
    checkpoint = tmp_path / 'fan.pth'
    torch.save(timm.create_model(name).state_dict(), checkpoint)
    model = timm.create_model(name, checkpoint_path=str(checkpoint)).eval()
    transform = create_transform(**resolve_model_data_config(model, args={'img_size': 64}))
    correct = _write_labelled_images(tmp_path / 'val', model, transform, np.random.default_rng(3))
    out = tmp_path / 'fan'
    assert main(['eval', '--data', str(tmp_path / 'val'), '--model', name,
                 '--img-size', '64', '--checkpoint', str(checkpoint), '--out', str(out), '--workers', '0',
                 '--device', 'cpu']) == 0
    results = json.loads((out / 'imagenet.json').read_text())
    assert results['data_config']['crop_pct'] == 1.0  # FAN's own config, kept unless overridden
    assert (results['top1'], results['top5']) == pytest.approx(tuple(100 * correct / IMAGES_PER_CELL))


def test_clear_errors(imagenet_c, tmp_path, capsys):
    assert main(_eval_c_args(imagenet_c, tmp_path / 'x')[:2] + ['resnet_18'] +
                _eval_c_args(imagenet_c, tmp_path / 'x')[3:]) == 2
    assert "unknown model 'resnet_18'" in capsys.readouterr().err
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    args = _eval_c_args(imagenet_c, tmp_path / 'x')
    args[args.index('--checkpoint') + 1] = str(bad)
    assert main(args) == 2
    assert f'cannot read checkpoint {bad}' in capsys.readouterr().err
    args = _eval_c_args(imagenet_c, tmp_path / 'x')
    args[args.index('--data') + 1] = str(tmp_path / 'missing')
    assert main(args) == 2
    assert 'ImageNet-C folder not found' in capsys.readouterr().err


def test_torchrun_two_processes_match_single_process(imagenet_c, tmp_path, free_port):
    single = tmp_path / 'single'
    assert main(_eval_c_args(imagenet_c, single, '--workers', '0')) == 0
    sharded = tmp_path / 'sharded'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
               '127.0.0.1', '--master_port', str(free_port), '-m', 'fan',
               *_eval_c_args(imagenet_c, sharded, '--workers', '0')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'on 2 process(es)' in run.stdout
    assert json.loads((sharded / 'imagenet_c.json').read_text()) == json.loads((single / 'imagenet_c.json').read_text())
