"""The one model path (fan.create_model) and the shared CLI convention, command by command.

Official-layout checkpoints are built from the conformance data (deterministic weights in the official key layout,
saved as the released files are: a timm 0.5.4 CheckpointSaver dict with an argparse.Namespace).
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform

import fan
from fan import create_model
from fan.cli import main
from fan.data import PHOTO_DIR, bundled_photos
from fan.demo import run_demo
from fan.errors import UserError
from fan.robustness.evaluate import AsStoredOrResized, ModelSpec

CONFORMANCE = Path(__file__).parent / 'conformance'
_spec = importlib.util.spec_from_file_location('recipe', CONFORMANCE / 'recipe.py')
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

HYBRID, SWIN, VIT = 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224', 'fan_tiny_12_p16_224'
WNID = ImageNetInfo().label_names()[967]  # espresso: the class of the bundled 'coffee' photo


def golden(name):
    return json.loads((CONFORMANCE / f'{name}.json').read_text())


def official_state_dict(name):
    return recipe.official_state_dict(golden(name)['keys'])


@pytest.fixture(scope='module')
def official_files(tmp_path_factory):
    """Official-layout release files for the hybrid and Swin golden models (state_dict and a zeroed EMA copy)."""
    root = tmp_path_factory.mktemp('official')
    files = {}
    for name in (HYBRID, SWIN):
        state_dict = official_state_dict(name)
        files[name] = root / f'{name}.pth.tar'
        torch.save({'state_dict': state_dict, 'state_dict_ema': {k: torch.zeros_like(v) for k, v in state_dict.items()},
                    'epoch': 299, 'args': argparse.Namespace(model=name), 'optimizer': {}}, files[name])
    return files


@pytest.fixture(scope='module')
def image_sets(tmp_path_factory):
    """One photo as: a folder, an ImageNet folder (<wnid>/), an ImageNet-C cell, and train/val class splits."""
    root = tmp_path_factory.mktemp('images')
    photo = Image.open(PHOTO_DIR / 'coffee.jpg').convert('RGB')
    for folder in (root / 'plain', root / 'imagenet' / WNID, root / 'imagenet_c' / 'gaussian_noise' / '1' / WNID):
        folder.mkdir(parents=True)
        photo.save(folder / 'coffee.png')
    for split in ('train', 'val'):
        for label, image in (('cup', photo), ('flipped', photo.transpose(Image.FLIP_TOP_BOTTOM))):
            (root / 'splits' / split / label).mkdir(parents=True)
            image.save(root / 'splits' / split / label / 'a.png')
    return root


# ----------------------------------------------------------------------------------------------- the model path

@pytest.mark.parametrize('name', [VIT, HYBRID, SWIN])
def test_create_model_loads_official_files_like_the_official_code(name, tmp_path):
    data = golden(name)
    state_dict = official_state_dict(name)
    path = tmp_path / 'release.pth.tar'
    torch.save({'state_dict': state_dict, 'state_dict_ema': {k: torch.zeros_like(v) for k, v in state_dict.items()},
                'args': argparse.Namespace(model=name)}, path)
    model = create_model(name, checkpoint=path).eval()  # the state_dict, as the official evaluation takes
    x = recipe.golden_input(data['input']['shape'], data['input']['seed'])
    with torch.no_grad():
        logits = model(x)
    reference = torch.tensor(data['logits'])
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-4
    assert 'state_dict' not in model.pretrained_cfg  # the loaded tensors do not live on in the config
    ema = create_model(name, checkpoint=path, use_ema=True)
    assert all(float(p.detach().abs().sum()) == 0 for p in ema.parameters())  # the zeroed EMA copy was taken


def test_create_model_heads_safetensors_and_options(tmp_path):
    torch.manual_seed(0)
    fine_tuned = timm.create_model(VIT, num_classes=3, depth=2)
    torch.save({'state_dict': fine_tuned.state_dict()}, tmp_path / 'ft.pth')
    loaded = create_model(VIT, checkpoint=tmp_path / 'ft.pth', depth=2)  # the file's own 3-class head
    assert loaded.num_classes == 3
    for key, value in fine_tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fresh = create_model(VIT, checkpoint=tmp_path / 'ft.pth', num_classes=5, depth=2)  # a new head, same body
    assert fresh.num_classes == 5
    assert torch.equal(fresh.state_dict()['blocks.1.mlp.q.weight'], fine_tuned.state_dict()['blocks.1.mlp.q.weight'])
    save_file(fine_tuned.state_dict(), tmp_path / 'ft.safetensors')
    from_safetensors = create_model(VIT, checkpoint=tmp_path / 'ft.safetensors', depth=2, dtype=torch.bfloat16)
    assert from_safetensors.head.weight.dtype == torch.bfloat16
    assert torch.equal(from_safetensors.head.weight.float(), fine_tuned.head.weight.bfloat16().float())
    swin = create_model(SWIN, img_size=256, depths=(1, 1, 1, 1))
    assert fan.resolve_data_config(swin)['input_size'] == (3, 256, 256)
    assert swin(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='fan_tinny_12_p16_224'), "unknown model 'fan_tinny_12_p16_224'; did you mean fan_tiny_12_p16_224"),
    (dict(name='fan_tiny_12_p16_224.in22k'), "has no weights tagged 'in22k'; its tags: nv_in1k"),
    (dict(name=VIT, checkpoint='missing.pth'), 'checkpoint not found: missing.pth'),
    (dict(name=VIT, checkpoint='corrupt'), r'cannot read checkpoint .*corrupt\.pth: not a PyTorch checkpoint'),
    (dict(name=VIT, checkpoint='unsafe'), r'cannot read checkpoint .*unsafe\.pth: it holds objects that are unsafe'),
    (dict(name=VIT, checkpoint='hybrid'), r'cannot load checkpoint .*hybrid\.pth into fan_tiny_12_p16_224: .*missing key'),
    (dict(name=VIT, checkpoint='hybrid', use_ema=True), 'has no EMA weights'),
])
def test_create_model_errors_name_the_problem(kwargs, message, tmp_path):
    checkpoint = kwargs.get('checkpoint')
    if checkpoint == 'corrupt':
        (tmp_path / 'corrupt.pth').write_bytes(b'\x80\x02garbage' * 20)
    elif checkpoint == 'unsafe':
        torch.save({'state_dict': {}, 'payload': argparse.ArgumentParser}, tmp_path / 'unsafe.pth')
    elif checkpoint == 'hybrid':
        torch.save({'state_dict': timm.create_model(HYBRID, depth=1).state_dict()}, tmp_path / 'hybrid.pth')
    if checkpoint in ('corrupt', 'unsafe', 'hybrid'):
        kwargs['checkpoint'] = tmp_path / f'{checkpoint}.pth'
    with pytest.raises(UserError, match=message):
        create_model(**kwargs)


def test_imagenet_c_protocols():
    """as-stored keeps an image that already has the input size; resize-crop resizes it (crop_pct < 1)."""
    spec = ModelSpec('resnet18', img_size=32, protocol='as-stored')
    _, config, as_stored = spec.build(torch.device('cpu'))
    assert config['crop_pct'] < 1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert isinstance(as_stored.transforms[-1], AsStoredOrResized)  # (after the conversion to the model's mode)
    assert torch.equal(as_stored(image), torch.from_numpy(np.array(image)).permute(2, 0, 1))
    _, _, resize_crop = ModelSpec('resnet18', img_size=32).build(torch.device('cpu'))
    assert resize_crop(image).shape == (3, 32, 32) and not torch.equal(resize_crop(image), as_stored(image))
    larger = image.resize((48, 40))
    assert torch.equal(as_stored(larger), resize_crop(larger))  # not the input size: resized either way


# ----------------------------------------------------------------------------------------------- the commands

def _command(command, name, checkpoint, sets, out):
    common = ['--model', name, '--checkpoint', str(checkpoint), '--out', str(out)]
    run = ['--device', 'cpu', '-b', '2']
    if command == 'predict':
        return ['predict', *common, *run, str(sets / 'plain' / 'coffee.png')]
    if command == 'eval':
        return ['eval', *common, *run, '-j', '0', '--data', str(sets / 'imagenet')]
    if command == 'eval-c':
        return ['eval-c', *common, *run, '-j', '0', '--data', str(sets / 'imagenet_c'),
                '--corruptions', 'gaussian_noise', '--severities', '1']
    if command == 'ood':
        return ['ood', *common, *run, '-j', '0', '--data', str(sets / 'plain'), '--ood', str(sets / 'imagenet')]
    if command == 'finetune':
        return ['finetune', *common, *run, '-j', '0', '--data', str(sets / 'splits'), '--mode', 'lp']
    if command == 'spectrum':
        return ['spectrum', *common, '-b', '2', '--data', str(sets / 'plain'), '--draws', '1']
    raise ValueError(command)


COMMANDS = ('predict', 'eval', 'eval-c', 'ood', 'finetune', 'spectrum')
OUTPUTS = {'predict': 'predictions.json', 'eval': 'imagenet.json', 'eval-c': 'imagenet_c.json',
           'ood': 'metrics.json', 'finetune': 'results.json', 'spectrum': 'spectrum.json'}


@pytest.mark.parametrize('command', COMMANDS)
@pytest.mark.parametrize('name', [HYBRID, SWIN])
def test_every_command_takes_official_hybrid_and_swin_checkpoints(command, name, official_files, image_sets,
                                                                  tmp_path):
    assert main(_command(command, name, official_files[name], image_sets, tmp_path / 'out')) == 0
    result = json.loads((tmp_path / 'out' / OUTPUTS[command]).read_text())
    assert result


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_names_a_mistyped_model_and_a_corrupt_checkpoint(command, image_sets, tmp_path, capsys):
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'PK\x03\x04 truncated zip')
    assert main(_command(command, 'fan_tinny_12_p16_224', corrupt, image_sets, tmp_path / 'out')) == 2
    error = capsys.readouterr().err
    assert error.startswith(f'fan {command}: error: unknown model') and 'fan_tiny_12_p16_224' in error
    assert len(error.strip().splitlines()) == 1  # one line, no traceback
    assert main(_command(command, VIT, corrupt, image_sets, tmp_path / 'out')) == 2
    error = capsys.readouterr().err
    assert error.startswith(f'fan {command}: error: cannot read checkpoint {corrupt}')
    assert len(error.strip().splitlines()) == 1


def test_other_user_errors_are_one_line(image_sets, tmp_path, capsys, monkeypatch):
    assert main(['bench', 'fan_tinny_12_p16_224', '--out', str(tmp_path)]) == 2
    assert "fan bench: error: unknown model 'fan_tinny_12_p16_224'" in capsys.readouterr().err
    assert main(['eval', '--model', VIT, '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path)]) == 2
    assert f'image folder not found: {tmp_path / "nowhere"}' in capsys.readouterr().err
    assert main(['finetune', '--model', VIT, '--data', str(image_sets / 'plain'), '--mode', 'lp']) == 2
    assert 'incomplete dataset' in capsys.readouterr().err
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    assert main(['predict', '--out', str(tmp_path), str(tmp_path / 'broken.jpg')]) == 2
    assert f'cannot read image {tmp_path / "broken.jpg"}' in capsys.readouterr().err
    monkeypatch.setitem(__import__('sys').modules, 'imagecorruptions', None)  # the extra is not installed
    assert main(['make-c', '--data', str(image_sets / 'plain'), '--out', str(tmp_path / 'c')]) == 2
    assert "pip install 'fan[robustness]'" in capsys.readouterr().err
    assert main(['list', '--filter', 'resnet*']) == 2
    assert "no FAN model matches 'resnet*'" in capsys.readouterr().err


def test_list_and_version(capsys):
    assert main(['list', '--filter', 'fan_tiny*']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert sorted(rows) == ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid']
    assert rows['fan_tiny_12_p16_224'][1:4] == ['FAN-ViT', '7.32', 'nv_in1k']
    assert rows['fan_tiny_8_p4_hybrid'][1:4] == ['FAN-Hybrid', '7.47', 'nv_in1k']
    with pytest.raises(SystemExit) as exit_info:
        main(['--version'])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f'fan {fan.__version__}'


def test_predict_on_the_bundled_photos_matches_the_model(tmp_path, capsys):
    torch.manual_seed(0)
    one_block = timm.create_model(VIT, depth=1, num_classes=10)
    torch.save(one_block.state_dict(), tmp_path / 'one_block.pth')
    assert main(['predict', '--checkpoint', str(tmp_path / 'one_block.pth'), '--out', str(tmp_path),
                 '--device', 'cpu']) == 2  # the default FAN-T has 12 blocks: the file does not fit
    assert 'missing' in capsys.readouterr().err
    assert main(['predict', '--top-k', '2', '--out', str(tmp_path), '--device', 'cpu']) == 0  # 1000 classes
    imagenet = json.loads((tmp_path / 'predictions.json').read_text())['predictions']
    assert imagenet[0]['image'] == 'chelsea' and imagenet[0]['true_label'] == 'tabby, tabby cat'
    assert all(not row['top'][0]['label'].isdigit() for row in imagenet)
    # predictions written by the command equal a direct forward pass of the same weights
    model = timm.create_model(VIT, num_classes=10)
    torch.save(model.state_dict(), tmp_path / 'full.pth')
    assert main(['predict', '--checkpoint', str(tmp_path / 'full.pth'), '--top-k', '3', '--out', str(tmp_path),
                 '--device', 'cpu', '-b', '4']) == 0
    written = json.loads((tmp_path / 'predictions.json').read_text())['predictions']
    photos = bundled_photos()
    assert [min(p.image.size) for p in photos] == [256] * 6
    transform = create_transform(**fan.resolve_data_config(model))
    with torch.no_grad():
        probs = model.eval()(torch.stack([transform(p.image) for p in photos])).softmax(-1)
    top = probs.topk(3)
    assert [row['image'] for row in written] == [p.name for p in photos]
    assert all(row['true_label'] is None and row['top'][0]['label'] == str(row['top'][0]['class']) for row in written)
    for row, p, i in zip(written, top.values, top.indices):
        assert [entry['class'] for entry in row['top']] == i.tolist()
        assert [entry['probability'] for entry in row['top']] == pytest.approx(p.tolist(), abs=1e-5)


def test_run_demo_reports_failures_and_keeps_going(tmp_path, capsys):
    steps = ('fan.zoo:demo_zoo_table', 'fan.demo:not_a_step', 'fan.augment:demo_smoothmix')
    assert run_demo(tmp_path, steps) == 1
    out = capsys.readouterr().out
    assert '2/3 steps done' in out and 'failed steps: fan.demo:not_a_step' in out
    assert 'fan_swin_large_patch4_window7_224' in (tmp_path / 'zoo.txt').read_text()
    assert (tmp_path / 'smoothmix.png').stat().st_size > 10_000
