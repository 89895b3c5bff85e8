"""Top-1/top-5 evaluation of a timm model over labelled image folders, on one process or many.

Under ``torchrun --nproc_per_node N`` every process takes every N-th image of each folder (no padding, no
duplicates) and the per-folder counts are summed with ``all_reduce``, so the numbers equal a single-process
run exactly. One DataLoader feeds all folders ("cells") in turn, so its workers keep decoding across cell
boundaries; its batches never mix two cells. Unreadable images are counted and reported, never fatal.
"""
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import Compose
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from ..errors import UserError
from ..factory import create_model, resolve_data_config
from ..io import ImageMode
from ..distributed import DistributedContext
from ..options import autocast
from .data import LabelledImage, LabelledImageDataset

__all__ = ['PROTOCOLS', 'AsStoredOrResized', 'ModelSpec', 'CellCounts', 'evaluate_cells']


class NormalizeUint8(nn.Module):
    """uint8 images (B x C x H x W, 0-255) -> float, normalised with ``mean``/``std`` given for [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer('mean', 255 * torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', 255 * torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


# How ImageNet-C images are preprocessed (recorded with every result)
PROTOCOLS = {
    'as-stored': 'images that already have the input size are used as stored; others get the model\'s resize and '
                 'centre crop (RobustBench, since 2022)',
    'resize-crop': 'every image resized to size / crop_pct and centre-cropped, the model\'s eval transform '
                   '(AugMix / Hendrycks et al.; upsamples the stored 224 px ImageNet-C images when crop_pct < 1)',
}


class AsStoredOrResized:
    """PIL image -> uint8 tensor (C, H, W): as stored when it is ``size`` (H, W) already, else ``resize(image)``."""

    def __init__(self, size: Tuple[int, int], resize: Callable):
        self.size = tuple(size)
        self.resize = resize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if (image.height, image.width) == self.size:
            return pil_to_tensor(image)
        return self.resize(image)


@dataclass
class ModelSpec:
    """Which model to evaluate (built with :func:`fan.create_model`) and how to preprocess its input.

    Preprocessing is the model's own timm data config; any field given here overrides it. ``protocol`` (see
    :data:`PROTOCOLS`) says whether images already at the input size are resized anyway.
    """
    name: str
    pretrained: bool = False
    checkpoint: Optional[Path] = None
    use_ema: bool = False
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    protocol: str = 'resize-crop'
    optimize: bool = True  # fan.optimize on the CPU

    def build(self, device: torch.device, num_classes: int = 1000) -> Tuple[torch.nn.Module, Dict, Callable]:
        """The model in eval mode on ``device`` (taking uint8 images), its data config, and the eval transform
        (PIL image in any mode -> uint8 tensor C x H x W, greyscale for a 1-channel model). The model must have
        ``num_classes`` outputs."""
        if self.protocol not in PROTOCOLS:
            raise UserError(f'unknown protocol {self.protocol!r}; choose from {", ".join(PROTOCOLS)}')
        model = create_model(self.name, pretrained=self.pretrained, checkpoint=self.checkpoint,
                             use_ema=self.use_ema, img_size=self.img_size,
                             optimize=self.optimize and device.type == 'cpu')
        if model.num_classes != num_classes:
            raise UserError(f'{self.name} has {model.num_classes} outputs; this dataset needs {num_classes}')
        data_config = resolve_data_config(model, crop_pct=self.crop_pct, interpolation=self.interpolation,
                                          mean=self.mean, std=self.std)
        # uint8 tensors leave the loader workers and are normalised on the device, like timm's prefetcher:
        # less CPU per image in the workers and a quarter of the host-to-device traffic
        transform = create_transform(**data_config, is_training=False, use_prefetcher=True)
        if self.protocol == 'as-stored':
            transform = AsStoredOrResized(data_config['input_size'][1:], transform)
        transform = Compose([ImageMode.for_channels(data_config['input_size'][0]), transform])
        model = nn.Sequential(NormalizeUint8(data_config['mean'], data_config['std']), model)
        return model.eval().to(device), data_config, transform

    def settings(self, data_config: Dict) -> Dict:
        """What determines the numbers (saved with results, compared on resume)."""
        spec = asdict(self)
        spec['model'] = spec.pop('name')
        spec['checkpoint'] = str(Path(self.checkpoint).resolve()) if self.checkpoint else None
        spec['protocol_description'] = PROTOCOLS[self.protocol]
        for key in ('img_size', 'crop_pct', 'interpolation', 'mean', 'std'):
            spec.pop(key)  # folded into data_config
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
        return dict(spec, data_config=config)


@dataclass
class CellCounts:
    """Counts for one folder of images, summed over all processes."""
    images: int = 0  # images evaluated (unreadable ones excluded)
    top1_correct: int = 0
    top5_correct: int = 0
    skipped: List[str] = field(default_factory=list)  # one 'cannot read image PATH: reason' per unreadable file


def _collate(batch: List[Tuple[Optional[torch.Tensor], int, str]]):
    """Stack readable images (B x C x H x W) and labels (B,); pass on the errors of unreadable ones."""
    readable = [(image, label) for image, label, _ in batch if image is not None]
    errors = [error for image, _, error in batch if image is None]
    if not readable:
        return None, None, errors
    return torch.stack([image for image, _ in readable]), torch.tensor([label for _, label in readable]), errors


def _correct_counts(
        logits: torch.Tensor,
        labels: torch.Tensor,
        class_subset: Optional[torch.Tensor],
) -> torch.Tensor:
    """[images, top-1 correct, top-5 correct] for logits (B x 1000) and ImageNet-1k labels (B,).

    With ``class_subset`` (ascending 1k indices), only those logit columns compete, as in the official
    ImageNet-A/R evaluation.
    """
    if class_subset is not None:
        logits = logits[:, class_subset]
    top_k = logits.topk(min(5, logits.shape[1]), dim=1).indices
    if class_subset is not None:
        top_k = class_subset[top_k]
    hits = top_k == labels[:, None]
    return torch.stack([torch.tensor(len(labels), device=logits.device), hits[:, 0].sum(), hits.any(dim=1).sum()])


def evaluate_cells(
        model: torch.nn.Module,
        transform: Callable,
        cells: Dict[str, Sequence[LabelledImage]],
        context: DistributedContext,
        on_cell_done: Callable[[str, CellCounts], None],
        batch_size: int = 64,
        workers: int = 4,
        precision: str = 'fp32',
        class_subset: Optional[Sequence[int]] = None,
) -> float:
    """Evaluate every cell (name -> images) in order, calling ``on_cell_done`` on every rank after each one.

    Returns:
        The fraction of this process's wall time spent waiting for the data loader (near 0: the model, not
        data loading, sets the pace).
    """
    device = context.device
    autocast_context = autocast(precision, device)
    shards = {name: list(items)[context.rank::context.world_size] for name, items in cells.items()}
    flat: List[LabelledImage] = []
    batches: List[List[int]] = []
    batches_per_cell = {}
    for name, shard in shards.items():
        start, stop = len(flat), len(flat) + len(shard)
        flat.extend(shard)
        cell_batches = [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
        batches.extend(cell_batches)
        batches_per_cell[name] = len(cell_batches)
    loader = DataLoader(
        LabelledImageDataset(flat, transform),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == 'cuda',
        prefetch_factor=4 if workers else None,
    )
    subset = torch.tensor(sorted(class_subset), device=device) if class_subset is not None else None
    batch_iter = iter(loader)
    overall = tqdm(total=len(flat), desc='all cells', unit='img', disable=not context.is_main, position=0)
    data_wait = 0.0
    start_time = time.perf_counter()
    with torch.inference_mode():
        for name in cells:
            counts = torch.zeros(3, dtype=torch.long, device=device)
            skipped: List[str] = []
            cell_bar = tqdm(total=len(shards[name]), desc=name, unit='img', leave=False,
                            disable=not (context.is_main and sys.stderr.isatty()), position=1)
            for _ in range(batches_per_cell[name]):
                wait_start = time.perf_counter()
                images, labels, errors = next(batch_iter)
                data_wait += time.perf_counter() - wait_start
                skipped.extend(errors)
                if images is not None:
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    with autocast_context():
                        logits = model(images)
                    counts += _correct_counts(logits.float(), labels, subset)
                cell_bar.update(len(errors) + (0 if labels is None else len(labels)))
                overall.update(len(errors) + (0 if labels is None else len(labels)))
            cell_bar.close()
            if context.world_size > 1:
                dist.all_reduce(counts)
                gathered: List[List[str]] = [[] for _ in range(context.world_size)]
                dist.all_gather_object(gathered, skipped)
                skipped = [error for part in gathered for error in part]
            images_done, top1, top5 = counts.tolist()
            on_cell_done(name, CellCounts(images_done, top1, top5, sorted(skipped)))
    overall.close()
    return data_wait / max(time.perf_counter() - start_time, 1e-9)
