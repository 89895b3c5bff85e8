"""fan train: the recipe table against the official scripts, learning on a generated two-class set, exact resume,
and a two-process torchrun run (gloo)."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fan
from fan.cli import main
from fan.train import PAPER_GLOBAL_BATCH, RECIPES

REFERENCE = Path(__file__).parent / 'reference' / 'training-recipes.md'  # copied from the official-recipe notes
TINY = ['--model', 'fan_tiny_12_p16_224', '--model-kwargs', 'depth=1', '--img-size', '64', '--recipe', 'none',
        '--device', 'cpu', '-j', '0', '-b', '8', '--lr', '2e-3', '--seed', '3']


@pytest.fixture(scope='module')
def two_classes(tmp_path_factory):
    """64 px images: horizontal (class a) or vertical (class b) stripes with random phase, colour and noise."""
    root = tmp_path_factory.mktemp('stripes')
    rng = np.random.default_rng(0)
    grid = np.arange(64)
    for split, count in (('train', 16), ('val', 8)):
        for label in ('a', 'b'):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                wave = 0.5 + 0.5 * np.sin(grid * rng.uniform(0.3, 0.6) + rng.uniform(0, 6))
                pattern = np.tile(wave[:, None], (1, 64)) if label == 'a' else np.tile(wave[None, :], (64, 1))
                image = pattern[..., None] * rng.uniform(80, 255, 3) + rng.normal(0, 20, (64, 64, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / label / f'{i}.png')
    return root


def _summary(out: Path):
    with (out / 'summary.csv').open() as file:
        return list(csv.DictReader(file))


def test_recipe_table_matches_the_official_scripts():
    rows = re.findall(r'^\| (fan_\w+) \| (\d+) \| ([\d.e-]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$',
                      REFERENCE.read_text(), re.M)
    assert len(rows) == 14
    for name, batch, lr, warmup, drop_path, reprob in rows:
        recipe = RECIPES[name.replace('fan_Xlarge', 'fan_xlarge')]  # the official spelling of the XL hybrid
        assert (recipe.per_gpu_batch, recipe.lr, recipe.warmup_epochs, recipe.drop_path, recipe.reprob) == (
            int(batch), float(lr), int(warmup), float(drop_path), float(reprob)), name
        assert (recipe.epochs, recipe.opt, recipe.weight_decay, recipe.sched, recipe.warmup_lr, recipe.min_lr) == (
            300, 'adamw', 0.05, 'cosine', 1e-6, 1e-6)
        assert (recipe.ema_decay, recipe.aa, recipe.remode, recipe.mixup, recipe.cutmix, recipe.smoothing) == (
            0.99992, 'rand-m9-mstd0.5-inc1', 'pixel', 0.8, 1.0, 0.1)
    assert PAPER_GLOBAL_BATCH == 1024


def test_paper_recipe_scales_the_learning_rate_and_flags_override(two_classes, tmp_path, capsys):
    args = ['train', '--model', 'fan_tiny_8_p4_hybrid', '--model-kwargs', 'depth=1', 'hybrid_depths=(1,1)',
            '--data', str(two_classes), '--out', str(tmp_path), '--device', 'cpu', '-j', '0', '-b', '16',
            '--epochs', '1', '--img-size', '64', '--precision', 'fp32', '--aa', 'rand-m9-mstd0.5-inc1']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lr 0.001 at the paper's global batch 1024 -> 1.56e-05 at global batch 16" in out
    import yaml
    resolved = yaml.safe_load((tmp_path / 'args.yaml').read_text())['resolved']
    assert resolved['recipe'] == 'paper' and resolved['lr'] == pytest.approx(1e-3 * 16 / 1024)
    assert (resolved['drop_path'], resolved['reprob'], resolved['mixup'], resolved['model_ema']) == (0.1, 0.3, 0.8, True)
    assert (resolved['epochs'], resolved['img_size']) == (1, 64)  # the flags given win
    assert len(_summary(tmp_path)) == 1


def test_loss_falls_over_three_epochs(two_classes, tmp_path):
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(tmp_path), '--epochs', '3']) == 0
    rows = _summary(tmp_path)
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    losses = [float(r['train_loss']) for r in rows]
    assert losses[2] < losses[0]


def test_resume_after_two_epochs_ends_with_the_weights_of_three(two_classes, tmp_path, monkeypatch):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(straight), '--epochs', '3',
                 '--model-ema', '--ema-decay', '0.9']) == 0
    import fan.train as train_module
    real_evaluate = train_module._evaluate
    calls = []

    def stop_after_two_epochs(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third epoch's evaluation, after two saved epochs
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, '_evaluate', stop_after_two_epochs)
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(resumed), '--epochs', '3',
                 '--model-ema', '--ema-decay', '0.9']) == 130
    assert torch.load(resumed / 'last.pth.tar', weights_only=True)['epoch'] == 2
    monkeypatch.setattr(train_module, '_evaluate', real_evaluate)
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(resumed), '--epochs', '3',
                 '--model-ema', '--ema-decay', '0.9', '--resume']) == 0
    a = torch.load(straight / 'last.pth.tar', weights_only=True)
    b = torch.load(resumed / 'last.pth.tar', weights_only=True)
    assert a['epoch'] == b['epoch'] == 3
    for key in ('state_dict', 'state_dict_ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key} {name}'
    assert _summary(straight) == _summary(resumed)
    # the checkpoints load through the model path (args is a plain dict: weights_only works)
    model = fan.create_model('fan_tiny_12_p16_224', checkpoint=resumed / 'model_best.pth.tar', depth=1, img_size=64)
    assert model.num_classes == 2
    ema = fan.create_model('fan_tiny_12_p16_224', checkpoint=resumed / 'last.pth.tar', use_ema=True, depth=1)
    assert torch.equal(ema.state_dict()['head.weight'], b['state_dict_ema']['head.weight'])


def test_bad_input(two_classes, tmp_path, capsys):
    assert main(['train', *TINY, '--data', str(tmp_path / 'none'), '--out', str(tmp_path)]) == 2
    assert 'dataset folder not found' in capsys.readouterr().err
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(tmp_path / 'new'), '--resume']) == 2
    assert 'nothing to resume' in capsys.readouterr().err
    assert main(['train', '--model', 'resnet18', '--recipe', 'paper', '--data', str(two_classes)]) == 2
    assert 'no paper recipe for resnet18' in capsys.readouterr().err


def test_torchrun_two_processes_train_an_epoch(two_classes, tmp_path, free_port):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
               '--master_port', str(free_port), '-m', 'fan', 'train', *TINY, '--data', str(two_classes),
               '--out', str(tmp_path), '--epochs', '1', '-b', '4']
    run = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '2 process(es)' in run.stdout
    rows = _summary(tmp_path)
    assert len(rows) == 1 and 0 <= float(rows[0]['eval_top1']) <= 100
    assert (tmp_path / 'last.pth.tar').is_file() and (tmp_path / 'model_best.pth.tar').is_file()


def test_a_kill_while_model_best_is_written_leaves_a_resume_that_writes_it(two_classes, tmp_path, monkeypatch):
    """model_best is written before last: a kill during its write (a temporary file left behind) leaves last at the
    epoch before, and the resumed run redoes the epoch and writes model_best. (Every epoch improves here.)"""
    import fan.train as train_module

    real_save, real_evaluate = train_module.save_torch, train_module._evaluate
    evaluations, best_writes = [], []

    def improving(*args, **kwargs):
        evaluations.append(1)
        return dict(real_evaluate(*args, **kwargs), eval_top1=float(len(evaluations)))

    def killed_writing_the_second_best(path, obj):
        if path.name == 'model_best.pth.tar':
            best_writes.append(obj['epoch'])
            if len(best_writes) == 2:
                path.with_name(f'.{path.name}.tmp').write_bytes(b'')  # what the kill leaves
                raise KeyboardInterrupt
        return real_save(path, obj)

    monkeypatch.setattr(train_module, '_evaluate', improving)
    monkeypatch.setattr(train_module, 'save_torch', killed_writing_the_second_best)
    out = tmp_path / 'out'
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(out), '--epochs', '2']) == 130
    assert torch.load(out / 'last.pth.tar', weights_only=True)['epoch'] == 1
    assert torch.load(out / 'model_best.pth.tar', weights_only=True)['epoch'] == 1
    monkeypatch.setattr(train_module, 'save_torch', real_save)
    assert main(['train', *TINY, '--data', str(two_classes), '--out', str(out), '--epochs', '2', '--resume']) == 0
    assert torch.load(out / 'model_best.pth.tar', weights_only=True)['epoch'] == 2
    assert torch.load(out / 'last.pth.tar', weights_only=True)['epoch'] == 2
