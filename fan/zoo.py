"""The zoo at a glance: ``fan list`` (registered models, size, official weights, licence) and ``fan predict``.

Parameters are counted on the meta device, so listing the zoo allocates no weights.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import timm
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config
from PIL import Image, UnidentifiedImageError

from .data import bundled_photos

__all__ = ['ZooEntry', 'zoo', 'format_zoo', 'load_model', 'classify']

FAN_MODULES = ('fan', 'fan_swin')
_FAMILIES = (('_hybrid', 'FAN-Hybrid'), ('fan_swin_', 'FAN-Swin'), ('', 'FAN-ViT'))


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    params: int
    weights: Tuple[str, ...]  # tags with official weights, e.g. ('nv_in1k',)
    license: str


def _family(name: str) -> str:
    return next(family for marker, family in _FAMILIES if marker in name)


def count_params(name: str) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def zoo(pattern: str = 'fan_*') -> List[ZooEntry]:
    """Every registered FAN model matching ``pattern``."""
    entries = []
    for name in timm.list_models(pattern, module=list(FAN_MODULES)):
        weights = tuple(n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*'))
        licenses = {timm.get_pretrained_cfg(f'{name}.{tag}').license for tag in weights}
        entries.append(ZooEntry(
            name, _family(name), count_params(name), weights,
            ', '.join(sorted(lic for lic in licenses if lic)) or '-'))
    return entries


def format_zoo(entries: Sequence[ZooEntry]) -> str:
    rows = [('model', 'family', 'params (M)', 'official weights', 'weights licence')]
    rows += [(e.name, e.family, f'{e.params / 1e6:.2f}', ', '.join(e.weights) or '-', e.license) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def load_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """Build a timm model by name (FAN or any other); ``checkpoint`` loads a local official/timm file through the
    model's checkpoint filter (with ``num_classes``, the file's own head of that size is kept), ``pretrained``
    downloads the default weights."""
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name!r}; `fan list` shows the FAN models, timm.list_models() all of them')
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
        overlay = dict(file=str(checkpoint))
        if 'num_classes' in kwargs:
            overlay['num_classes'] = kwargs['num_classes']
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def read_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'cannot read image {path}: {e}') from e


@torch.inference_mode()
def classify(model: torch.nn.Module, images: Sequence[Image.Image], top_k: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, class indices), each (B, k), with the model's own eval preprocessing."""
    transform = create_transform(**resolve_model_data_config(model))
    batch = torch.stack([transform(im) for im in images])
    probs = model.eval()(batch).softmax(dim=-1)
    return probs.topk(min(top_k, probs.shape[-1]), dim=-1)


def _print_predictions(names: Sequence[str], probs: torch.Tensor, indices: torch.Tensor,
                       labels: Optional[Sequence[int]] = None) -> None:
    info = ImageNetInfo()
    for i, name in enumerate(names):
        truth = f' (true: {info.index_to_description(labels[i])})' if labels else ''
        print(f'{name}{truth}')
        for p, c in zip(probs[i].tolist(), indices[i].tolist()):
            label = info.index_to_description(c) if probs.shape[-1] == 1000 else str(c)
            print(f'    {p:6.1%}  {label}')


def demo_zoo_table(out_dir: Path) -> None:
    """Demo step: the zoo table, also written to zoo.txt."""
    table = format_zoo(zoo())
    print(table)
    (out_dir / 'zoo.txt').write_text(table + '\n')


def demo_classify_photos(out_dir: Path, model_name: str = 'fan_tiny_12_p16_224') -> None:
    """Demo step: a FAN forward pass on the bundled photos (random weights: official weights cannot be fetched here)."""
    photos = bundled_photos()
    model = load_model(model_name)
    probs, indices = classify(model, [p.image for p in photos])
    print(f'{model_name} with RANDOM weights on {len(photos)} bundled photos: the pipeline runs, the predictions mean '
          f'nothing (`fan predict --model {model_name} --checkpoint fan_vit_tiny.pth.tar IMAGE` with official weights)')
    _print_predictions([p.name for p in photos], probs, indices, [p.label for p in photos])


def _list(args: argparse.Namespace) -> int:
    print(format_zoo(zoo(args.filter)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    if args.images:
        paths = [Path(p) for p in args.images]
        names, images, labels = [str(p) for p in paths], [read_image(p) for p in paths], None
    else:
        photos = bundled_photos()
        names, images, labels = [p.name for p in photos], [p.image for p in photos], [p.label for p in photos]
    probs, indices = classify(model, images, args.top_k)
    _print_predictions(names, probs, indices, labels)
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser('list', help='list the FAN models: params, official weights, licence')
    parser.add_argument('--filter', default='fan_*', help='model name pattern (default: %(default)s)')
    parser.set_defaults(func=_list)

    parser = subparsers.add_parser('predict', help='classify images (default: the bundled photos)')
    parser.add_argument('--model', default='fan_tiny_12_p16_224', help='any timm model name (default: %(default)s)')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help='download the default official weights')
    weights.add_argument('--checkpoint', help='a local checkpoint file (official .pth.tar or timm checkpoint)')
    parser.add_argument('--top-k', type=int, default=5)
    parser.add_argument('images', nargs='*', help='image files (default: the photos bundled with scikit-image etc.)')
    parser.set_defaults(func=_predict)
