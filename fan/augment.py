"""SmoothMix (Lee et al., CVPR 2020 Workshops): mixing with soft-edged masks, behind timm's ``Mixup`` interface.

Each image is blended with its partner in the flipped batch through a mask G with values in [0, 1]:
``x_mixed = G * x + (1 - G) * x.flip(0)``, and the targets are mixed with ``lam = mean(G)``, the share of the
image that stays its own, so ``lam`` is exact rather than drawn from a Beta distribution. Two masks:

* ``'S'``: a square of side ``U(0, 1)`` (relative to the image side) at a uniform random centre, 1 inside and
  falling linearly to 0 across a border band of relative width ``k`` around it.
* ``'C'``: a Gaussian ellipse ``exp(-((x - cx)^2 / (2 sx^2) + (y - cy)^2 / (2 sy^2)))`` at a uniform random centre
  with ``sx, sy`` drawn independently from ``U(*sigma)`` (relative to the image width and height).

Coordinates are relative to the image (0 to 1 along each axis), so on a non-square image the "square" stretches
with the image. ``SmoothMix(...)(x, target)`` returns ``(x_mixed, soft_target)`` like ``timm.data.Mixup``, with the
same ``prob``, ``switch_prob``, ``mode`` ('batch', 'pair', 'elem'), ``label_smoothing`` and ``mixup_enabled``
switch, and targets built by ``timm.data.mixup.mixup_target``, so it drops into timm training scripts with
``SoftTargetCrossEntropy``. With ``mixup_alpha > 0`` each draw is plain mixup with probability
``1 - switch_prob`` (as timm alternates mixup and CutMix).
"""
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from timm.data.mixup import mixup_target

__all__ = ['SmoothMix', 'square_mask', 'gaussian_mask']

MASKS = ('S', 'C')
MODES = ('batch', 'pair', 'elem')


def _grid(height: int, width: int, device: Optional[torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relative pixel-centre coordinates: rows (1, 1, H, 1) and columns (1, 1, 1, W) in (0, 1)."""
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    columns = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return rows.view(1, 1, height, 1), columns.view(1, 1, 1, width)


def square_mask(height: int, width: int, center: torch.Tensor, side: torch.Tensor, k: float,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Square masks (M, 1, H, W): 1 inside, linear fall to 0 over a border of width k (hard edge for k = 0).

    Args:
        center: (M, 2) centres as relative (row, column) coordinates in [0, 1].
        side: (M,) side of the inner square, relative to the image side.
        k: width of the border band, relative to the image side.
    """
    rows, columns = _grid(height, width, device)
    center, side = center.to(device=device, dtype=torch.float32), side.to(device=device, dtype=torch.float32)
    distance = torch.maximum((rows - center[:, 0].view(-1, 1, 1, 1)).abs(),
                             (columns - center[:, 1].view(-1, 1, 1, 1)).abs())  # Chebyshev distance to the centre
    outside = distance - side.view(-1, 1, 1, 1) / 2
    if k == 0:
        return (outside <= 0).float()
    return (1 - outside / k).clamp(0, 1)


def gaussian_mask(height: int, width: int, center: torch.Tensor, sigma: torch.Tensor,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Gaussian ellipse masks (M, 1, H, W) with peak 1.

    Args:
        center: (M, 2) centres as relative (row, column) coordinates in [0, 1].
        sigma: (M, 2) standard deviations along rows and columns, relative to the image height and width.
    """
    rows, columns = _grid(height, width, device)
    center, sigma = center.to(device=device, dtype=torch.float32), sigma.to(device=device, dtype=torch.float32)
    d_rows = (rows - center[:, 0].view(-1, 1, 1, 1)) / sigma[:, 0].view(-1, 1, 1, 1)
    d_columns = (columns - center[:, 1].view(-1, 1, 1, 1)) / sigma[:, 1].view(-1, 1, 1, 1)
    return torch.exp(-(d_rows ** 2 + d_columns ** 2) / 2)


class SmoothMix:
    """SmoothMix with the call interface of ``timm.data.Mixup``.

    Args:
        mask: 'S' (square with a linear border) or 'C' (Gaussian ellipse).
        k: border width of the 'S' mask, relative to the image side.
        sigma: range of the 'C' mask's standard deviations, relative to the image size.
        mixup_alpha: if > 0, plain mixup (lam ~ Beta(alpha, alpha)) replaces SmoothMix with probability
            ``1 - switch_prob``.
        prob: probability of mixing a batch ('batch') or an element ('pair', 'elem').
        switch_prob: probability of SmoothMix rather than mixup when ``mixup_alpha > 0``.
        mode: 'batch' (one mask for the batch), 'pair' (one per pair i, B-1-i, used both ways) or 'elem' (one per
            image).
        label_smoothing: smoothing of the one-hot targets before mixing.
        num_classes: number of classes of the targets.
    """

    def __init__(self, mask: str = 'S', k: float = 0.2, sigma: Tuple[float, float] = (0.25, 0.5),
                 mixup_alpha: float = 0., prob: float = 1.0, switch_prob: float = 0.5, mode: str = 'batch',
                 label_smoothing: float = 0.1, num_classes: int = 1000):
        if mask not in MASKS:
            raise ValueError(f"unknown mask '{mask}'; choose 'S' (square) or 'C' (Gaussian)")
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
        if k < 0:
            raise ValueError(f'k must be >= 0, got {k}')
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f'sigma must be a range (low, high) with 0 < low <= high, got {sigma}')
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
            raise ValueError(f'prob and switch_prob must be within [0, 1], got {prob} and {switch_prob}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.mask, self.k, self.sigma, self.mixup_alpha = mask, k, tuple(sigma), mixup_alpha
        self.mix_prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.mixup_enabled = True  # set to False by the training loop to stop mixing (timm convention)

    def sample_masks(self, count: int, height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """``count`` masks (count, 1, H, W); unmixed draws are all ones, mixup draws the constant lam."""
        center = torch.rand(count, 2)
        if self.mask == 'S':
            masks = square_mask(height, width, center, torch.rand(count), self.k, device)
        else:
            low, high = self.sigma
            masks = gaussian_mask(height, width, center, low + (high - low) * torch.rand(count, 2), device)
        if self.mixup_alpha > 0:
            use_mixup = (torch.rand(count) >= self.switch_prob).to(masks.device)
            lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample((count,)).to(masks.device)
            masks = torch.where(use_mixup.view(-1, 1, 1, 1), lam.view(-1, 1, 1, 1).expand_as(masks), masks)
        mixed = (torch.rand(count) < self.mix_prob).to(masks.device) & self.mixup_enabled
        return torch.where(mixed.view(-1, 1, 1, 1), masks, torch.ones_like(masks))

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix images x (B, C, H, W) with x.flip(0); returns the mixed images (a new tensor) and soft targets
        (B, num_classes) from class indices target (B,)."""
        batch_size, _, height, width = x.shape
        if self.mode == 'batch':
            masks = self.sample_masks(1, height, width, x.device)
        elif self.mode == 'elem':
            masks = self.sample_masks(batch_size, height, width, x.device)
        else:
            if batch_size % 2:
                raise ValueError(f"mode 'pair' needs an even batch size, got {batch_size}")
            half = self.sample_masks(batch_size // 2, height, width, x.device)
            masks = torch.cat([half, half.flip(0)])
        lam: Union[float, torch.Tensor] = masks.mean(dim=(1, 2, 3))  # share of each image that stays its own
        masks = masks.to(x.dtype)
        mixed = masks * x + (1 - masks) * x.flip(0)
        lam = float(lam) if self.mode == 'batch' else lam.unsqueeze(1)
        return mixed, mixup_target(target, self.num_classes, lam, self.label_smoothing)


def demo_smoothmix(out_dir: Path) -> None:
    """SmoothMix 'S' and 'C' masks on pairs of bundled photos; saves a grid and prints each mixed image's lam."""
    from matplotlib.figure import Figure
    import torchvision.transforms.functional as TF

    from fan.data import bundled_photos

    photos = bundled_photos()[:4]
    images = torch.stack([TF.to_tensor(TF.center_crop(TF.resize(p.image, 160), 160)) for p in photos])
    labels = torch.tensor([p.label for p in photos])
    torch.manual_seed(0)
    smoothing, num_classes = 0.1, 1000
    off = smoothing / num_classes  # smoothed one-hot values: the own label's weight gives lam back
    on = 1 - smoothing + off
    fig = Figure(figsize=(2.6 * len(photos), 6.0))
    axes = fig.subplots(2, len(photos))
    for row, mask in enumerate(MASKS):
        mixed, target = SmoothMix(mask=mask, mode='elem', label_smoothing=smoothing, num_classes=num_classes)(
            images, labels)
        for col, photo in enumerate(photos):
            partner = photos[len(photos) - 1 - col]
            lam = (float(target[col, photo.label]) - off) / (on - off)
            axes[row, col].imshow(mixed[col].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row, col].set_title(f'{mask}: {photo.name} {lam:.2f}\n+ {partner.name}', fontsize=8)
            axes[row, col].axis('off')
            print(f'  mask {mask}: {photo.name:<13} + {partner.name:<13} lam (own label weight) {lam:.3f}, '
                  f'target row sums to {float(target[col].sum()):.4f}')
    fig.tight_layout()
    fig.savefig(out_dir / 'smoothmix.png', dpi=90)
    print(f'  grid of mixed photos: {out_dir / "smoothmix.png"}')
