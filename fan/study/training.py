"""Training of the study's models on Fashion-MNIST: in-memory tensors, one recipe for every model, resumable at any
step.

The 60,000 training images stay in memory as uint8 (47 MB); each batch is augmented on the fly (a random shift of up
to 2 pixels through zero padding, a random horizontal flip), resized to the model's input size (bilinear, antialiased,
as the model's data config) and normalised with the dataset's mean and std. A run writes a checkpoint every
``CHECKPOINT_SECONDS`` and at each epoch's end (atomically): model, optimizer, the step reached and the random state,
so an interrupted run continues where it stopped, with the same batches.
"""
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import timm
from timm.optim import create_optimizer_v2
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..data.fashion_mnist import DATA_CONFIG, MEAN, STD, FashionMnist
from ..errors import UserError
from ..io import save_torch, write_json

__all__ = ['StudyModel', 'Recipe', 'MODELS', 'build_model', 'prepare_batch',
           'train_run', 'class_subset', 'predict', 'evaluate_accuracy', 'run_name', 'CHECKPOINT_SECONDS']

CHECKPOINT_SECONDS = 60.  # at most this much training is lost to an interruption


@dataclass(frozen=True)
class StudyModel:
    key: str  # short name in tables and folders
    family: str  # 'FAN-ViT', ..., 'ViT', 'XCiT', 'ConvNet'
    arch: str  # timm model name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # constructor arguments (baselines: their micro shape)
    img_size: int = 28  # input size (Fashion-MNIST's 28 px images are resized to it)

    @property
    def is_fan(self) -> bool:
        return self.family.startswith('FAN')


_GREY = dict(in_chans=1, num_classes=10)
# the FAN micro models, and baselines of about the same size (parameters) trained with the same recipe
MODELS: Tuple[StudyModel, ...] = (
    StudyModel('fan_vit', 'FAN-ViT', 'fan_micro_2_p4_28'),
    StudyModel('fan_hybrid', 'FAN-Hybrid', 'fan_micro_3_p8_hybrid_32', img_size=32),
    StudyModel('fan_swin', 'FAN-Swin', 'fan_swin_micro_patch4_window4_32', img_size=32),
    StudyModel('vit', 'ViT', 'vit_tiny_patch16_224',
               dict(_GREY, img_size=28, patch_size=4, embed_dim=128, depth=4, num_heads=4)),
    StudyModel('xcit', 'XCiT', 'xcit_nano_12_p8_224',
               dict(_GREY, img_size=56, embed_dim=128, depth=2, num_heads=4), img_size=56),
    StudyModel('convnet', 'ConvNet', 'convnext_atto',
               dict(_GREY, patch_size=1, depths=(1, 1, 1, 1), dims=(24, 48, 128, 256))),
)


@dataclass(frozen=True)
class Recipe:
    """The one training recipe of the study (AdamW, linear warm-up then cosine decay, label smoothing)."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    max_shift: int = 2  # random translation, pixels
    hflip: float = 0.5


def run_name(spec: StudyModel, seed: int, classes: Optional[Sequence[int]] = None) -> str:
    """The folder name of a run below ``OUT/runs``."""
    return f'{spec.key}-seed{seed}' + (f'-classes{classes[0]}-{classes[-1]}' if classes else '')


def build_model(spec: StudyModel, **kwargs: Any) -> nn.Module:
    """The model of ``spec`` with random weights; its data config is Fashion-MNIST's (input size, mean, std)."""
    overlay = dict(DATA_CONFIG, input_size=(1, spec.img_size, spec.img_size))
    return timm.create_model(spec.arch, pretrained_cfg_overlay=overlay, **{**spec.kwargs, **kwargs})


def prepare_batch(images: torch.Tensor, size: int, recipe: Optional[Recipe] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 images (B, 28, 28) -> normalised float (B, 1, size, size); augmented when a ``recipe`` is given."""
    x = images.float().div_(255)
    if recipe is not None:  # a random shift (zero padding, then a crop at a random offset) and a random flip
        B, H, W = x.shape
        pad = recipe.max_shift
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)
        rows = offsets[:, :1] + torch.arange(H)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(W)  # (B, W)
        x = padded[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]
        flip = torch.rand(B, generator=generator) < recipe.hflip
        x = torch.where(flip[:, None, None], x.flip(-1), x)
    x = x.unsqueeze(1)
    if size != x.shape[-1]:
        x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return (x - MEAN[0]) / STD[0]


def _lr_at(step: int, total_steps: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, size: int, batch_size: int = 500) -> torch.Tensor:
    """Top-1 class (N,) of ``model`` for uint8 images (N, 28, 28) resized to ``size``."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(prepare_batch(images[start:start + batch_size], size).to(device)).argmax(-1).cpu()
                      for start in range(0, len(images), batch_size)])


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, 28, 28) resized to ``size``."""
    return (predict(model, images, size) == labels).float().mean().item()


def _epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000 + epoch))


def train_run(spec: StudyModel, seed: int, recipe: Recipe, data: FashionMnist, run_dir: Path,
              device: torch.device = torch.device('cpu'), fast: bool = True, classes: Optional[Tuple[int, ...]] = None,
              progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None) -> Dict[str, Any]:
    """Train ``spec`` with ``recipe`` from ``seed`` on ``device`` (resuming ``run_dir/checkpoint.pth`` if there is
    one; ``fast``: ``fan.optimize`` on the CPU) and write ``run_dir/weights.pth`` (the final float32 weights) and
    ``run_dir/history.json`` (per epoch: test accuracy, loss, training time). ``classes`` trains on those classes
    only (relabelled 0..k-1). Returns the history."""
    from .. import optimize

    history_path, weights_path = run_dir / 'history.json', run_dir / 'weights.pth'
    if weights_path.is_file() and history_path.is_file():
        import json
        return json.loads(history_path.read_text())
    images, labels, test_images, test_labels = data.train_images, data.train_labels, data.test_images, data.test_labels
    if classes is not None:
        images, labels = class_subset(images, labels, classes)
        test_images, test_labels = class_subset(test_images, test_labels, classes)
    torch.manual_seed(seed)
    model = build_model(spec, drop_path_rate=0., num_classes=len(classes) if classes else 10).to(device)
    if fast and device.type == 'cpu':
        optimize(model)
    optimizer = create_optimizer_v2(model, 'adamw', lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(images) // recipe.batch_size
    total_steps = steps_per_epoch * recipe.epochs
    state = {'step': 0, 'history': [], 'train_seconds': 0., 'loss_sum': 0., 'loss_count': 0}
    checkpoint_path = run_dir / 'checkpoint.pth'
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
        if checkpoint['recipe'] != asdict(recipe) or checkpoint['arch'] != spec.arch:
            raise UserError(f'{checkpoint_path} was written with another recipe or model: use another --out')
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        torch.set_rng_state(checkpoint['rng'])
        state = checkpoint['state']
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    def save() -> None:
        save_torch(checkpoint_path, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'rng': torch.get_rng_state(), 'state': state, 'recipe': asdict(recipe),
                                     'arch': spec.arch})

    last_save = time.monotonic()
    while state['step'] < total_steps:
        model.train()
        step = state['step']
        epoch, index = divmod(step, steps_per_epoch)
        order = _epoch_order(seed, epoch, len(images))[index * recipe.batch_size:(index + 1) * recipe.batch_size]
        generator = torch.Generator().manual_seed(seed * 10_000_000 + step)
        started = time.perf_counter()
        x = prepare_batch(images[order], spec.img_size, recipe, generator).to(device)
        for group in optimizer.param_groups:
            group['lr'] = _lr_at(step, total_steps, recipe)
        loss = criterion(model(x), labels[order].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state['train_seconds'] += time.perf_counter() - started
        state['loss_sum'] += loss.item()
        state['loss_count'] += 1
        state['step'] = step + 1
        if state['step'] % steps_per_epoch == 0:
            accuracy = evaluate_accuracy(model, test_images, test_labels, spec.img_size)
            state['history'].append({
                'epoch': epoch + 1, 'test_top1': accuracy, 'train_loss': state['loss_sum'] / state['loss_count'],
                'train_seconds': state['train_seconds'],
                'train_img_s': state['step'] * recipe.batch_size / state['train_seconds']})
            state['loss_sum'], state['loss_count'] = 0., 0
            save()
            last_save = time.monotonic()
        elif time.monotonic() - last_save > CHECKPOINT_SECONDS:
            save()
            last_save = time.monotonic()
        if progress is not None:
            progress(state['step'], total_steps, {'loss': loss.item()})
    save_torch(weights_path, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    history = {'model': spec.key, 'arch': spec.arch, 'seed': seed, 'recipe': asdict(recipe),
               'classes': list(classes) if classes else None,
               'params': sum(p.numel() for p in model.parameters()), 'epochs': state['history']}
    write_json(history_path, history)
    checkpoint_path.unlink(missing_ok=True)
    return history


def class_subset(images: torch.Tensor, labels: torch.Tensor, classes: Tuple[int, ...]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images of ``classes``, relabelled 0..k-1 in that order."""
    keep = torch.isin(labels, torch.tensor(classes))
    mapping = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    return images[keep], mapping[labels[keep]]
