"""The nn.Module contract: what a timm user does to a model works on the plain FAN model of each family as it works on
timm's own model of the same kind (XCiT for FAN-ViT, ConvNeXt for the hybrids' stem, Swin for FAN-Swin). Every check
runs on both, which shows the check itself is sound."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

import fan  # noqa: F401  (registers the FAN models)
from naive import randomize_norm_statistics

MODELS = [
    'fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224',  # ours
    'xcit_tiny_12_p16_224', 'convnext_atto', 'swin_tiny_patch4_window7_224',  # timm's peers
]
SIZE = 64


def build(name: str) -> nn.Module:
    """The model at 64 px with 10 classes and no stochastic depth; BatchNorm statistics randomised (not 0 / 1)."""
    torch.manual_seed(0)
    kwargs = {} if name.startswith('convnext') else {'img_size': SIZE}
    return randomize_norm_statistics(timm.create_model(name, num_classes=10, drop_path_rate=0., **kwargs))


def images(batch: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(dtype)


def leaves(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def fused_attention_dropouts(model: nn.Module) -> set:
    """The ``attn_drop`` modules of fused attention: timm's idiom hands their rate to SDPA instead of calling them."""
    return {f'{name}.attn_drop' for name, m in model.named_modules()
            if getattr(m, 'fused_attn', False) and isinstance(getattr(m, 'attn_drop', None), nn.Dropout)}


@pytest.mark.parametrize('name', MODELS)
def test_hooks_on_every_leaf_fire_and_what_they_capture_stays(name):
    """Forward hooks on every leaf module fire, in train and eval mode, and the tensors they captured are not
    changed afterwards (Grad-CAM, activation capture and observers read them after the forward)."""
    model = build(name)
    for training, grad in ((True, True), (False, True), (False, False)):
        model.train(training)
        fired, captured = set(), []

        def hook(module, args, out, name=None):
            fired.add(name)
            if isinstance(out, torch.Tensor):
                captured.append((name, out, out.detach().clone()))

        handles = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in leaves(model)]
        with torch.set_grad_enabled(grad):
            model(images())
        for handle in handles:
            handle.remove()
        silent = sorted({n for n, _ in leaves(model)} - fired - fused_attention_dropouts(model))
        assert not silent, (training, grad, silent[:10])
        changed = [n for n, out, at_hook in captured if not torch.equal(out.detach(), at_hook)]
        assert not changed, (training, grad, changed[:10])


@pytest.mark.parametrize('name', MODELS)
def test_every_norm_becomes_a_sync_batch_norm_that_is_reached(name):
    """``convert_sync_batchnorm``: every BatchNorm becomes a SyncBatchNorm, and each one's forward runs, in eval and
    training (on the CPU, without a process group, SyncBatchNorm normalises as BatchNorm does)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build(name))
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    reached = set()
    for norm in norms:
        norm.register_forward_hook(lambda module, args, out: reached.add(id(module)))
    for training in (False, True):
        reached.clear()
        model.train(training)
        model(images())
        assert len(reached) == len(norms), (training, len(reached), len(norms))


@pytest.mark.parametrize('name', MODELS)
def test_dynamic_quantization_takes_every_linear_and_keeps_top1(name):
    """``quantize_dynamic(model, {nn.Linear})`` replaces every ``nn.Linear``; the int8 model keeps the float model's
    top-1 class on at least 13 of 16 images and its logits within 25 % of the largest (random weights: small top-1
    margins, so a few flips are int8 rounding, not a missed layer, which would change the logits wholesale)."""
    model = build(name).eval()
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert sum(type(m) is DynamicQuantizedLinear for m in quantized.modules()) == linears
    assert linears and not any(isinstance(m, nn.Linear) for m in quantized.modules())
    x = images(16)
    with torch.no_grad():
        got, want = quantized(x), model(x)
    assert (got.argmax(1) == want.argmax(1)).sum() >= 13
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.25


MODES = {
    'fp32': (False, lambda: torch.no_grad()),
    'bf16-autocast': (False, lambda: torch.autocast('cpu', dtype=torch.bfloat16)),
    'train': (True, lambda: torch.enable_grad()),
}


@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('name', MODELS)
def test_weight_writes_after_a_forward_show_in_the_next_output(name, mode):
    """A write through ``.data`` and a ``load_state_dict`` after a first forward: the next output equals that of a
    fresh copy of the written model, in float32 and bfloat16-autocast inference and in training."""
    training, context = MODES[mode]
    model = build(name).train(training)
    x = images(2)
    with torch.no_grad(), context():
        model(x)
    for p in model.parameters():
        p.data.mul_(1.25)
    fresh = copy.deepcopy(model)
    with torch.no_grad(), context():
        torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    fresh = copy.deepcopy(model)
    with torch.no_grad(), context():
        torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16], ids=['double', 'half'])
@pytest.mark.parametrize('name', MODELS)
def test_other_dtypes_train(name, dtype):
    """``.double()`` and ``.half()``: a training step's forward and backward run, with finite gradients."""
    model = build(name).to(dtype).train()
    out = model(images(2, dtype))
    assert out.dtype == dtype
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
