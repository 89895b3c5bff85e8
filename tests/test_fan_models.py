"""FAN models: golden outputs of the official implementation, checkpoint loading, the timm model interface."""
import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
import timm
import torch

import fan
from fan.cpu import kernels
from fan.cpu.modules import FastWindowAttention
from fan.models.fan import LegacyLayerNorm, LegacyLayerNorm2d
from fan.models.fan_swin import FanSwin
from fan.zoo import count_params

CONFORMANCE = Path(__file__).parent / 'conformance'
_spec = importlib.util.spec_from_file_location('recipe', CONFORMANCE / 'recipe.py')
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

OFFICIAL_PARAMS = {
    'fan_tiny_12_p16_224': 7_319_920,
    'fan_small_12_p16_224': 28_345_336,
    'fan_base_18_p16_224': 54_350_320,
    'fan_large_24_p16_224': 80_574_100,
    'fan_small_12_p16_224_se_attn': 27_452_440,
    'fan_tiny_8_p4_hybrid': 7_467_240,
    'fan_small_12_p4_hybrid': 26_117_944,
    'fan_base_16_p4_hybrid': 50_475_048,
    'fan_large_16_p4_hybrid': 76_855_140,
    'fan_xlarge_16_p4_hybrid': 120_407_316,
    'fan_swin_tiny_patch4_window7_224': 29_538_940,
    'fan_swin_small_patch4_window7_224': 53_064_220,
    'fan_swin_base_patch4_window7_224': 93_599_448,
    'fan_swin_large_patch4_window7_224': 208_941_136,
}
# the micro models for 28-32 px greyscale images (Fashion-MNIST): this project's, no official counterpart
MICRO_PARAMS = {
    'fan_micro_2_p4_28': 935_890,
    'fan_micro_3_p8_hybrid_32': 1_257_030,
    'fan_swin_micro_patch4_window4_32': 1_229_602,
}
GOLDEN = ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224']


def golden(name):
    return json.loads((CONFORMANCE / f'{name}.json').read_text())


def released_file(tmp_path, state_dict, name, wrap='saver'):
    """Save a state dict the way checkpoints are released (timm CheckpointSaver dict with an argparse.Namespace)."""
    if wrap == 'saver':
        obj = {'state_dict': state_dict, 'epoch': 299, 'arch': name, 'version': 2, 'metric': 79.2,
               'args': argparse.Namespace(model=name, lr=2e-3), 'optimizer': {'state': {}, 'param_groups': []}}
    elif wrap == 'ema':  # a release file of an EMA run: both, the EMA weights 1.05x the state_dict here
        obj = {'state_dict': state_dict, 'state_dict_ema': {k: v * 1.05 for k, v in state_dict.items()},
               'args': argparse.Namespace(model=name)}
    elif wrap == 'ddp':
        obj = {'model': {'module.' + k: v for k, v in state_dict.items()}}
    else:
        obj = state_dict
    path = tmp_path / f'{name}.pth.tar'
    torch.save(obj, path)
    return path


def test_registered_models_and_params():
    assert set(timm.list_models('fan_*')) == set(OFFICIAL_PARAMS) | set(MICRO_PARAMS)
    for name, params in {**OFFICIAL_PARAMS, **MICRO_PARAMS}.items():
        assert count_params(name) == params, name


@pytest.mark.parametrize('optimized', [False, True], ids=['plain', 'optimized'])
@pytest.mark.parametrize('name', GOLDEN)
def test_conformance_with_official_outputs(tmp_path, name, optimized):
    """The plain model, and the same model after fan.optimize, against the official outputs."""
    data = golden(name)
    path = released_file(tmp_path, recipe.official_state_dict(data['keys']), name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    if optimized:
        fan.optimize(model)
    x = recipe.golden_input(data['input']['shape'], data['input']['seed'])
    with torch.no_grad():
        logits = model(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    for ours, ref in ((logits, torch.tensor(data['logits'])), (pre_logits, torch.tensor(data['pre_logits']))):
        assert ours.shape == ref.shape
        assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert sum(p.numel() for p in model.parameters()) == data['params']


@pytest.mark.parametrize('optimized', [False, True], ids=['plain', 'optimized'])
@pytest.mark.parametrize('name', GOLDEN)
def test_bf16_autocast_inference_keeps_top1_on_golden_inputs(tmp_path, name, optimized, monkeypatch):
    """CPU autocast to bfloat16, plain and optimized (the bfloat16 fast paths): every golden image keeps the official
    model's top-1 class, and the logits stay within 5 % of the largest. Optimized FAN-Swin's window attention takes
    its bfloat16 path in every block."""
    data = golden(name)
    path = released_file(tmp_path, recipe.official_state_dict(data['keys']), name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    if optimized:
        fan.optimize(model)
    x = recipe.golden_input(data['input']['shape'], data['input']['seed'])
    bf16_window_attn = []
    bf16_inference = FastWindowAttention._bf16_inference
    monkeypatch.setattr(FastWindowAttention, '_bf16_inference',
                        lambda module, *args: bf16_window_attn.append(module) or bf16_inference(module, *args))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(x).float()
    ref = torch.tensor(data['logits'])
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 5e-2
    if isinstance(model, FanSwin) and optimized:
        assert len(bf16_window_attn) == sum(len(stage.blocks) for stage in model.layers)


def _official_name(name: str) -> str:
    """Our parameter name -> the official one: FAN-Swin's patch merging sits at the end of the previous stage
    there (timm 0.5.4 layout) and its head is ``head``, not ``head.fc``."""
    name = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', name)
    return re.sub(r'^head\.fc\.', 'head.', name)


@pytest.mark.parametrize('optimized', [False, True], ids=['plain', 'optimized'])
@pytest.mark.parametrize('name', GOLDEN)
def test_training_mode_matches_official_outputs_and_gradients(tmp_path, name, optimized, monkeypatch):
    """Training mode (batch-statistics BatchNorm; optimized: recomputing mixers, the hybrids' ConvNeXt MLPs in chunks
    of tokens) against the official implementation: logits, the input gradient and every parameter gradient of
    sum(logits * R) (see conformance/make_train_golden.py)."""
    monkeypatch.setattr(kernels, 'TRAINING_CHUNK_BYTES', 100_000)  # several chunks at this test's small size
    data, ref = golden(name), json.loads((CONFORMANCE / 'train' / f'{name}.json').read_text())
    path = released_file(tmp_path, recipe.official_state_dict(data['keys']), name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), drop_path_rate=0.)
    if optimized:
        fan.optimize(model)
    model.train()
    x = recipe.golden_input(data['input']['shape'], data['input']['seed']).requires_grad_()
    logits = model(x)
    (logits * recipe.golden_input(logits.shape, seed=1)).sum().backward()
    expected = torch.tensor(ref['logits'])
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4
    projections = torch.tensor([(x.grad * recipe.golden_input(x.shape, seed=100 + i)).sum().item() for i in range(8)])
    expected = torch.tensor(ref['input_grad_projections'])
    assert ((projections - expected).abs().max() / expected.abs().max()).item() < 1e-4
    ours = {_official_name(k): p.grad.norm().item() for k, p in model.named_parameters()}
    assert set(ours) == set(ref['grad_norms'])
    largest = max(ref['grad_norms'].values())
    for key, norm in ref['grad_norms'].items():  # biases under a softmax have zero gradients up to rounding
        assert ours[key] == pytest.approx(norm, rel=1e-3, abs=1e-6 * largest), key


@pytest.mark.parametrize('wrap', ['ema', 'ddp', 'bare'])
def test_checkpoint_wrappings_load(tmp_path, wrap):
    name = 'fan_tiny_12_p16_224'
    data = golden(name)
    state_dict = recipe.official_state_dict(data['keys'])
    path = released_file(tmp_path, state_dict, name, wrap)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.state_dict()['blocks.3.mlp.temperature'], state_dict['blocks.3.mlp.temperature'])


def test_every_entry_point_loads_the_state_dict_of_a_release_file(tmp_path, monkeypatch):
    """A release file holding ``state_dict`` and ``state_dict_ema``: timm's ``pretrained=True`` (the release URL,
    its download stubbed with the file), its ``pretrained_cfg_overlay=dict(file=...)``, ``fan.create_model`` with the
    file or the tag, and a command all give the golden output of the ``state_dict``, as the official evaluation
    does; the EMA weights only with ``use_ema=True``."""
    import timm.models._builder

    name = 'fan_tiny_12_p16_224'
    data = golden(name)
    path = released_file(tmp_path, recipe.official_state_dict(data['keys']), name, 'ema')
    downloads = []
    monkeypatch.setattr(timm.models._builder, 'download_cached_file',
                        lambda url, **kwargs: downloads.append(url) or str(path))
    monkeypatch.setattr('fan.factory._released_file', lambda tag: downloads.append(tag) or path)
    x = recipe.golden_input(data['input']['shape'], data['input']['seed'])
    expected = torch.tensor(data['logits'])
    models = {
        'timm pretrained': timm.create_model(f'{name}.nv_in1k', pretrained=True),
        'timm overlay file': timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))),
        'fan checkpoint': fan.create_model(name, checkpoint=path),
        'fan pretrained': fan.create_model(f'{name}.nv_in1k', pretrained=True),
    }
    assert len(downloads) == 2
    for source, model in models.items():
        with torch.no_grad():
            logits = model.eval()(x)
        assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4, source
    ema = fan.create_model(name, checkpoint=path, use_ema=True).eval()
    torch.testing.assert_close(ema.state_dict()['blocks.3.mlp.temperature'],
                               1.05 * models['fan checkpoint'].state_dict()['blocks.3.mlp.temperature'])


def test_checkpoint_filter_splits_fused_class_attention_qkv():
    name = 'fan_tiny_12_p16_224'
    state_dict = recipe.official_state_dict(golden(name)['keys'])
    fused = dict(state_dict)
    for i in range(2):
        for kind in ('weight', 'bias'):
            fused[f'cls_attn_blocks.{i}.attn.qkv.{kind}'] = torch.cat(
                [fused.pop(f'cls_attn_blocks.{i}.attn.{n}.{kind}') for n in 'qkv'])
    fused['pos_embeder.token_projection.weight'] = fused.pop('pos_embed.token_projection.weight')
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=fused))
    torch.testing.assert_close(model.state_dict()['cls_attn_blocks.1.attn.k.bias'],
                               state_dict['cls_attn_blocks.1.attn.k.bias'])


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    name = 'fan_tiny_12_p16_224'
    state_dict = recipe.official_state_dict(golden(name)['keys'])
    del state_dict['blocks.5.mlp.q.weight']
    state_dict['blocks.5.mlp.extra'] = torch.zeros(1)
    path = released_file(tmp_path, state_dict, name)
    with pytest.raises(ValueError, match=r'1 missing key\(s\) \[.blocks\.5\.mlp\.q\.weight.\].*blocks\.5\.mlp\.extra'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


class NotAllowed:
    pass


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    name = 'fan_tiny_12_p16_224'
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'payload': NotAllowed()}, path)
    with pytest.raises(ValueError, match='unsafe to load'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_new_head_and_in_chans(tmp_path):
    name = 'fan_tiny_8_p4_hybrid'
    path = released_file(tmp_path, recipe.official_state_dict(golden(name)['keys']), name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=10, in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_pretrained_cfgs_point_at_the_release():
    cfg = timm.get_pretrained_cfg('fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384')
    assert cfg.url.endswith('/v1.0.0/fan_hybrid_base_in22k_1k_384.pth.tar')
    assert cfg.input_size == (3, 384, 384) and cfg.crop_pct == 1.0 and cfg.interpolation == 'bicubic'
    assert timm.get_pretrained_cfg('fan_large_16_p4_hybrid.nv_in22k').num_classes == 19167
    assert cfg.license == 'nvidia-source-code-license-nc'
    assert set(timm.list_pretrained('fan_*')) >= {
        'fan_tiny_12_p16_224.nv_in1k', 'fan_small_12_p16_224.nv_in1k', 'fan_base_18_p16_224.nv_in1k',
        'fan_tiny_8_p4_hybrid.nv_in1k', 'fan_small_12_p4_hybrid.nv_in1k', 'fan_base_16_p4_hybrid.nv_in1k',
        'fan_large_16_p4_hybrid.nv_in22k_ft_in1k_384', 'fan_base_16_p4_hybrid.nv_in22k'}


def test_official_xlarge_spelling_is_a_deprecated_alias():
    with pytest.warns(UserWarning, match='deprecated'):
        model = timm.create_model('fan_Xlarge_16_p4_hybrid', depth=(1, 1), hybrid_depths=(1, 1))
    assert model.feature_info[-1]['reduction'] == 32 and model.num_features == 768


@pytest.mark.parametrize('name', ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid'])
def test_any_input_size_multiple_of_16(name):
    model = timm.create_model(name, depth=2).eval()
    x = torch.randn(1, 3, 80, 112)
    assert model.forward_features(x).shape == (1, 1 + 5 * 7, model.num_features)
    with pytest.raises(Exception, match='not a multiple of the stem stride 16'):
        model(torch.randn(1, 3, 80, 100))


def test_swin_input_size_rule():
    model = timm.create_model('fan_swin_tiny_patch4_window7_224', img_size=256, depths=(1, 1, 1, 1)).eval()
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    with pytest.raises(Exception, match="doesn't match model"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match='multiple of 32'):
        timm.create_model('fan_swin_tiny_patch4_window7_224', img_size=200)


@pytest.mark.parametrize('name, strides', [
    ('fan_tiny_12_p16_224', [16, 16, 16]),
    ('fan_tiny_8_p4_hybrid', [4, 8, 16]),
    ('fan_swin_tiny_patch4_window7_224', [4, 8, 16, 32]),
])
def test_features_only_strides(name, strides):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == strides
    maps = model(torch.randn(1, 3, 224, 224))
    for fmap, stride, chs in zip(maps, strides, model.feature_info.channels()):
        assert fmap.shape == (1, chs, 224 // stride, 224 // stride)


def test_forward_intermediates_match_forward_features():
    model = timm.create_model('fan_tiny_8_p4_hybrid', depth=3).eval()
    x = torch.randn(2, 3, 64, 96)
    final, inter = model.forward_intermediates(x, indices=[0, 1, 4])
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape for t in inter] == [(2, 128, 16, 24), (2, 256, 8, 12), (2, 192, 4, 6)]
    assert model.prune_intermediate_layers([0, 1, 3]) == [0, 1, 3] and len(model.blocks) == 2


def test_grad_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model('fan_tiny_12_p16_224', depth=2, drop_path_rate=0.)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    ref_grad = model.blocks[0].mlp.q.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.blocks[0].mlp.q.weight.grad, ref_grad)


def test_model_interface():
    model = timm.create_model('fan_tiny_12_p16_224', num_classes=0, global_pool='avg', drop_path_rate=0.1)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    params = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(params)
    assert 'pos_embed.token_projection.weight' in model.no_weight_decay()
    assert {b.drop_path.drop_prob for b in model.blocks} == {0.1}  # uniform over depth, as trained
    model.reset_classifier(7, 'token')
    assert model.get_classifier().out_features == 7
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 12 + 3


def test_se_ablation_runs_forward_and_backward():
    model = timm.create_model('fan_small_12_p16_224_se_attn', depth=2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_hybrid_legacy_norm_is_selectable():
    legacy = timm.create_model('fan_tiny_8_p4_hybrid', depth=1).eval()
    modern = timm.create_model('fan_tiny_8_p4_hybrid', depth=1, legacy_norm=False).eval()
    modern.load_state_dict(legacy.state_dict())
    stages = list(legacy.patch_embed.backbone.stages.modules())
    assert sum(isinstance(m, LegacyLayerNorm) for m in stages) == 3 + 3  # the block norms (channels-last)
    assert sum(isinstance(m, LegacyLayerNorm2d) for m in stages) == 1  # the stage-1 downsample norm
    assert not isinstance(legacy.patch_embed.backbone.stem[1], LegacyLayerNorm2d)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(legacy(x), modern(x))


def test_patch_4_stem_for_small_images():
    """patch_size=4 (28-32 px images, e.g. Fashion-MNIST): timm's ConvPatchEmbed with two stride-2 conv + BatchNorm
    pairs (D/2, then D channels), a 7 x 7 grid at 28 px; it trains, and fan.optimize folds it like the others."""
    import copy

    from timm.models.xcit import ConvPatchEmbed

    model = timm.create_model('fan_tiny_12_p16_224', patch_size=4, img_size=28, in_chans=1, embed_dim=64, depth=2,
                              num_heads=4, num_classes=10)
    stem = model.patch_embed
    assert type(stem) is ConvPatchEmbed and stem.patch_size == 4
    convs = [m for m in stem.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(1, 32, (2, 2)), (32, 64, (2, 2))]
    x = torch.randn(3, 1, 28, 28)
    tokens, grid = stem(x)
    assert tokens.shape == (3, 49, 64) and grid == (7, 7)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    optimized = fan.optimize(copy.deepcopy(model)).eval()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model.eval()(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='patch_size must be 4, 8 or 16'):
        timm.create_model('fan_tiny_12_p16_224', patch_size=2)


@pytest.mark.parametrize('name', sorted(MICRO_PARAMS))
def test_micro_models_on_fashion_mnist_sized_images(name):
    """The micro models take 1-channel 28 / 32 px images (10 classes); their feature maps follow feature_info."""
    model = timm.create_model(name).eval()
    channels, size, _ = model.pretrained_cfg['input_size']
    x = torch.randn(2, channels, size, size)
    assert channels == 1 and size in (28, 32) and model(x).shape == (2, 10)
    features = timm.create_model(name, features_only=True).eval()
    maps = features(x)
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [m.shape[-1] for m in maps] == [size // r for r in features.feature_info.reduction()]
    intermediates = model.forward_intermediates(x, intermediates_only=True)
    assert [(m.shape[1], m.shape[-1]) for m in intermediates] == [
        (info['num_chs'], size // info['reduction']) for info in model.feature_info]
    with pytest.raises(ValueError, match='patch_size must be 4, 8 or 16 for the hybrid stem'):
        timm.create_model('fan_micro_3_p8_hybrid_32', patch_size=2)
