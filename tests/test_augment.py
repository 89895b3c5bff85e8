"""SmoothMix masks against per-pixel formulas, lam against the mixed pixels, and timm Mixup compatibility."""
import math

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

from fan.augment import SmoothMix, gaussian_mask, square_mask


def constant_batch(values, size=(12, 20)):
    """Images (B, 3, H, W) whose pixels all equal values[i]."""
    return torch.tensor(values, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 3, *size).clone()


def test_square_mask_matches_formula():
    height, width, k = 9, 14, 0.2
    center, side = torch.tensor([[0.3, 0.8], [0.5, 0.5]]), torch.tensor([0.25, 0.9])
    masks = square_mask(height, width, center, side, k)
    assert masks.shape == (2, 1, height, width)
    for m in range(2):
        for i in range(height):
            for j in range(width):
                y, x = (i + 0.5) / height, (j + 0.5) / width
                distance = max(abs(y - center[m, 0].item()), abs(x - center[m, 1].item()))
                inside_by = side[m].item() / 2 - distance  # > 0 inside the inner square
                expected = 1.0 if inside_by >= 0 else max(0.0, 1 + inside_by / k)
                assert masks[m, 0, i, j].item() == pytest.approx(expected, abs=1e-6)
    hard = square_mask(height, width, center, side, 0.)
    assert set(hard.unique().tolist()) <= {0., 1.}


def test_gaussian_mask_matches_formula():
    height, width = 10, 7
    center, sigma = torch.tensor([[0.2, 0.6]]), torch.tensor([[0.3, 0.45]])
    mask = gaussian_mask(height, width, center, sigma)
    for i in range(height):
        for j in range(width):
            dy = ((i + 0.5) - 0.2 * height) / (0.3 * height)  # sigma relative to the height / width
            dx = ((j + 0.5) - 0.6 * width) / (0.45 * width)
            assert mask[0, 0, i, j].item() == pytest.approx(math.exp(-(dx * dx + dy * dy) / 2), rel=1e-5)


@pytest.mark.parametrize('mask', ['S', 'C'])
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_lam_equals_share_of_mixed_pixels(mask, mode):
    torch.manual_seed(0)
    num_classes, smoothing = 5, 0.1
    values = [1.0, 3.0, 7.0, 2.0]  # pixel values of the four constant images
    x, target = constant_batch(values), torch.tensor([0, 1, 2, 3])
    mix = SmoothMix(mask=mask, mode=mode, label_smoothing=smoothing, num_classes=num_classes)
    for _ in range(5):
        mixed, soft = mix(x, target)
        assert mixed.shape == x.shape and soft.shape == (4, num_classes)
        torch.testing.assert_close(soft.sum(1), torch.ones(4, dtype=soft.dtype))
        off = smoothing / num_classes
        on = 1 - smoothing + off
        for i in range(4):
            own, partner = values[i], values[3 - i]
            lam_pixels = (mixed[i].mean().item() - partner) / (own - partner)  # mean(G * own + (1 - G) * partner)
            lam_target = (soft[i, i].item() - off) / (on - off)
            assert lam_target == pytest.approx(lam_pixels, abs=1e-5)
            assert soft[i, 3 - i].item() == pytest.approx((1 - lam_target) * (on - off) + off, abs=1e-6)
        if mode != 'elem':  # pairs share their mask: both images keep the same share of themselves
            assert soft[0, 0].item() == pytest.approx(soft[3, 3].item(), abs=1e-6)
    assert torch.equal(x, constant_batch(values)), 'the input batch must not be modified'


def test_masks_are_soft_and_vary():
    torch.manual_seed(1)
    for mask in ('S', 'C'):
        masks = SmoothMix(mask=mask).sample_masks(200, 32, 32)
        assert masks.min() >= 0 and masks.max() <= 1
        lam = masks.mean(dim=(1, 2, 3))
        assert 0.02 < lam.mean() < 0.8 and lam.std() > 0.05
        soft = ((masks > 0.01) & (masks < 0.99)).float().mean()
        assert soft > 0.05, 'masks need a smooth transition region'


def test_gaussian_sigma_range_controls_size():
    torch.manual_seed(2)
    small = SmoothMix(mask='C', sigma=(0.05, 0.06)).sample_masks(100, 32, 32).mean()
    large = SmoothMix(mask='C', sigma=(0.5, 0.6)).sample_masks(100, 32, 32).mean()
    assert small < 0.03 < 0.3 < large


def test_mixup_switch_prob_and_disable():
    torch.manual_seed(3)
    x, target = constant_batch([0.0, 1.0]), torch.tensor([0, 1])
    always_mixup = SmoothMix(mask='S', mixup_alpha=1.0, switch_prob=0.0, mode='elem', num_classes=2)
    mixed, soft = always_mixup(x, target)
    for i in range(2):
        assert mixed[i].std() < 1e-12, 'mixup blends with a constant weight'
    never_mixed = SmoothMix(prob=0.0, label_smoothing=0.2, num_classes=2)
    mixed, soft = never_mixed(x, target)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(soft, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    switched_off = SmoothMix(mode='pair', num_classes=2)
    switched_off.mixup_enabled = False
    assert torch.equal(switched_off(x, target)[0], x)


def test_drops_into_a_timm_training_step():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    images_mixed, soft = SmoothMix(mask='C', mode='pair', num_classes=10)(images, labels)
    loss = SoftTargetCrossEntropy()(model(images_mixed), soft)
    loss.backward()
    assert torch.isfinite(loss) and model[0].weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask 'X'"):
        SmoothMix(mask='X')
    with pytest.raises(ValueError, match="unknown mode 'half'"):
        SmoothMix(mode='half')
    with pytest.raises(ValueError, match='sigma'):
        SmoothMix(sigma=(0.5, 0.25))
    with pytest.raises(ValueError, match='even batch size'):
        SmoothMix(mode='pair')(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
