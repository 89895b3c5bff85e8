"""FAN as a backbone at any input size, torchvision detection / segmentation, export and torch.compile.

Small configs (one or two blocks per stage) keep the suite fast; the code paths are those of the full models.
"""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import fan
from fan.cli import main
from fan.dense import FpnSegmentation, fpn_backbone
from fan.export import export_model

CONFORMANCE = Path(__file__).parent / 'conformance'
_spec = importlib.util.spec_from_file_location('recipe', CONFORMANCE / 'recipe.py')
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

SMALL_HYBRID = dict(depth=1, hybrid_depths=(1, 1))
SMALL_SWIN = dict(depths=(1, 1, 1, 1), dynamic_img_size=True)


# ----------------------------------------------------------------------------------------------- input sizes

def test_two_width_model_norm_and_pruning():
    model = timm.create_model('fan_xlarge_16_p4_hybrid', depth=(2, 1), hybrid_depths=(1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    plain = model.forward_intermediates(x, intermediates_only=True)
    normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert [f.shape[1] for f in normed] == [128, 256, 528, 768, 768]  # block 1 ends with the 528 -> 768 embed
    torch.testing.assert_close(normed[2], plain[2])  # 528 wide: returned as it is
    for index in (3, 4):  # the final width: the final norm applied per token
        tokens = plain[index].flatten(2).transpose(1, 2)
        expected = model.norm(tokens).transpose(1, 2).reshape(plain[index].shape)
        torch.testing.assert_close(normed[index], expected)
    model.prune_intermediate_layers(indices=[2])  # keeps only the 528-wide stage: the 768 norm cannot stay
    assert isinstance(model.norm, torch.nn.Identity)
    (feature,) = model.forward_intermediates(x, indices=[2], norm=True, intermediates_only=True)
    torch.testing.assert_close(feature, plain[2])
    assert model.forward_features(x).shape == (1, 16, 528)


def test_patch_8_stem_and_dynamic_padding():
    model = timm.create_model('fan_tiny_12_p16_224', patch_size=8, depth=2, num_classes=0).eval()
    (feature,) = model.forward_intermediates(torch.randn(2, 3, 40, 40), indices=1, intermediates_only=True)
    assert feature.shape == (2, 192, 5, 5)  # stride 8
    with pytest.raises(AssertionError, match='input height 44 is not a multiple of the stem stride 8'):
        model(torch.randn(1, 3, 44, 40))
    padded = timm.create_model('fan_tiny_8_p4_hybrid', dynamic_img_pad=True, **SMALL_HYBRID).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), padded(F.pad(x, (0, 10, 0, 14))))  # zero-padded to 64 x 80


def test_fan_swin_any_size_from_one_model():
    backbone = timm.create_model('fan_swin_tiny_patch4_window7_224', features_only=True, dynamic_img_size=True)
    with torch.no_grad():
        maps = backbone.eval()(torch.randn(1, 3, 480, 640))
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 120, 160), (192, 60, 80), (384, 30, 40), (768, 15, 20)]
    small = timm.create_model('fan_swin_tiny_patch4_window7_224', features_only=True, **SMALL_SWIN).eval()
    for height, width in ((256, 320), (512, 1024)):
        with torch.no_grad():
            maps = small(torch.randn(1, 3, height, width))
        assert [m.shape[-2:] for m in maps] == [(height // s, width // s) for s in (4, 8, 16, 32)]
    fixed = timm.create_model('fan_swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1)).eval()
    fixed.set_input_size(img_size=(256, 320))
    assert fixed(torch.randn(1, 3, 256, 320)).shape == (1, 1000)


# ----------------------------------------------------------------------------------------------- torchvision

def _detector(name, **kwargs):
    backbone = fpn_backbone(name, out_channels=64, **kwargs)
    levels = len(backbone.strides) + 1  # + the max-pool level
    anchors = AnchorGenerator(tuple((16 * 2 ** i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    pooler = MultiScaleRoIAlign([str(i) for i in range(len(backbone.strides))], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=3, rpn_anchor_generator=anchors, box_roi_pool=pooler,
                      min_size=128, max_size=192)


@pytest.mark.parametrize('name, kwargs', [('fan_tiny_8_p4_hybrid', SMALL_HYBRID),
                                          ('fan_swin_tiny_patch4_window7_224', SMALL_SWIN)])
def test_torchvision_faster_rcnn_trains_a_step(name, kwargs):
    torch.manual_seed(0)
    detector = _detector(name, **kwargs)
    images = [torch.rand(3, 120, 160), torch.rand(3, 150, 110)]  # two sizes, resized and padded by torchvision
    targets = [{'boxes': torch.tensor([[10., 20., 80., 90.]]), 'labels': torch.tensor([1])},
               {'boxes': torch.tensor([[5., 5., 60., 100.], [30., 40., 90., 140.]]), 'labels': torch.tensor([2, 1])}]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses = detector.train()(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    stem = next(detector.backbone.body.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        detections = detector.eval()(images)
    assert len(detections) == 2 and set(detections[0]) == {'boxes', 'labels', 'scores'}


def test_segmentation_head_at_cityscapes_aspect_ratio():
    model = FpnSegmentation(fpn_backbone('fan_tiny_8_p4_hybrid', out_channels=32, **SMALL_HYBRID), num_classes=19)
    images, labels = torch.randn(2, 3, 128, 256), torch.randint(0, 19, (2, 128, 256))
    logits = model(images)
    assert logits.shape == (2, 19, 128, 256)
    F.cross_entropy(logits, labels).backward()
    assert model.backbone.body.model.patch_embed.backbone.stem[0].weight.grad is not None


# ----------------------------------------------------------------------------------------------- export and compile

@pytest.fixture(scope='module')
def official_hybrid(tmp_path_factory):
    """The golden tiny hybrid as an official-layout release file."""
    data = json.loads((CONFORMANCE / 'fan_tiny_8_p4_hybrid.json').read_text())
    path = tmp_path_factory.mktemp('official') / 'fan_hybrid_tiny.pth.tar'
    torch.save({'state_dict': recipe.official_state_dict(data['keys']), 'args': argparse.Namespace()}, path)
    return path


def test_fan_export_onnx_with_dynamic_batch_and_size(official_hybrid, tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    assert main(['export', '--model', 'fan_tiny_8_p4_hybrid', '--checkpoint', str(official_hybrid),
                 '--format', 'onnx', '--out', str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / 'export.json').read_text())
    assert manifest['opset'] == 18 and manifest['dynamic'] == ['batch', 'height', 'width']
    assert [c['input_shape'] for c in manifest['checks']] == [[3, 3, 224, 224], [1, 3, 224, 288]]
    assert all(c['max_relative_error'] < 1e-4 for c in manifest['checks'])
    assert 'max relative error vs PyTorch' in capsys.readouterr().out
    import onnxruntime  # an independent run of the file: batch 2 at 160 x 192, never seen during export
    session = onnxruntime.InferenceSession(str(tmp_path / 'model.onnx'))
    model = fan.create_model('fan_tiny_8_p4_hybrid', checkpoint=official_hybrid).eval()
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        expected = model(x)
    output = torch.from_numpy(session.run(None, {'images': x.numpy()})[0])
    assert ((output - expected).abs().max() / expected.abs().max()) < 1e-4


@pytest.mark.parametrize('fmt', ['hub', 'exported'])
def test_hub_layout_and_exported_program_round_trip(fmt, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('fan_tiny_12_p16_224', depth=1, num_classes=7)
    manifest = export_model(model, fmt, tmp_path)
    assert all(c['max_relative_error'] < 1e-4 for c in manifest['checks'])
    if fmt == 'hub':
        assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'export.json', 'model.safetensors']
        reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
        assert reloaded.num_classes == 7 and len(reloaded.blocks) == 1
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), model.eval()(x))
    else:
        program = torch.export.load(str(tmp_path / 'model.pt2')).module()
        x = torch.randn(2, 3, 160, 208)  # dynamic batch and size
        with torch.no_grad():
            torch.testing.assert_close(program(x), model.eval()(x))


@pytest.mark.parametrize('name, kwargs, size', [
    ('fan_tiny_12_p16_224', dict(depth=1), 64),
    ('fan_tiny_8_p4_hybrid', SMALL_HYBRID, 64),
    ('fan_swin_tiny_patch4_window7_224', dict(depths=(1, 1, 1, 1)), 224),
])
def test_compile_fullgraph_without_graph_breaks(name, kwargs, size):
    """Dynamo traces the whole forward as one graph (backend 'eager': the trace is what is checked, not codegen)."""
    torch._dynamo.reset()
    model = timm.create_model(name, **kwargs).eval()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
