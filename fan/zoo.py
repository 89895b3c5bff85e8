"""The zoo at a glance: ``fan list`` (registered models, size, weights tags, licence) and ``fan predict``.

Parameters are counted on the meta device, so listing the zoo allocates no weights.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import ImageNetInfo

from .data import bundled_photos
from .data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES, bundled_samples, load_fashion_mnist
from .errors import MissingPathError, UserError
from .factory import create_image_transform, create_model, resolve_data_config
from .io import image_files, read_images, write_atomic, write_json
from .options import (add_model_options, add_out_option, add_run_options, autocast, model_from_args, positive_int,
                      resolve_device)
from .models._checkpoint import FASHION_MNIST_TAG, packaged_weights, packaged_weights_record
from .registry import FAMILIES, fan_models

__all__ = ['ZooEntry', 'zoo', 'format_zoo', 'count_params', 'classify']

DEMO_MODEL = 'fan_tiny_12_p16_224'
DEMO_WEIGHTS_TIMEOUT = 20  # seconds to try downloading the official FAN-T weights in the demo


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    params: int
    weights: Tuple[str, ...]  # tags with weights, e.g. ('nv_in1k',) or ('fashion_mnist',)
    license: str


def count_params(name: str, **kwargs) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def zoo(pattern: str = '*') -> List[ZooEntry]:
    """Every registered FAN model whose name matches ``pattern``, family by family."""
    entries = []
    for family in FAMILIES:
        members = set(family.models())
        for name in timm.list_models(pattern, module=family.module):
            if name not in members:
                continue
            weights = tuple(n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*'))
            licenses = {timm.get_pretrained_cfg(f'{name}.{tag}').license for tag in weights}
            entries.append(ZooEntry(name, family.name, count_params(name), weights,
                                    ', '.join(sorted(lic for lic in licenses if lic)) or '-'))
    return entries


def format_zoo(entries: Sequence[ZooEntry]) -> str:
    rows = [('model', 'family', 'params (M)', 'weights (tags)', 'weights licence')]
    rows += [(e.name, e.family, f'{e.params / 1e6:.2f}', ', '.join(e.weights) or '-', e.license) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


@torch.inference_mode()
def classify(model: nn.Module, images: Sequence[Image.Image], top_k: int = 5, precision: str = 'fp32'
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, class indices), each (B, k), with the model's own eval preprocessing."""
    transform = create_image_transform(resolve_data_config(model))
    device = next(model.parameters()).device
    batch = torch.stack([transform(im) for im in images]).to(device)
    with autocast(precision, device)():
        probs = model.eval()(batch).float().softmax(dim=-1)
    return probs.topk(min(top_k, probs.shape[-1]), dim=-1)


def _predictions(names: Sequence[str], probs: torch.Tensor, indices: torch.Tensor, num_classes: int,
                 labels: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None) -> List[dict]:
    """One dict per image: its top-k classes (``class_names``, else ImageNet's for a 1000-class model, else indices)
    and its true label if known."""
    if class_names is not None:
        describe = class_names.__getitem__
    elif num_classes == 1000:
        describe = ImageNetInfo().index_to_description
    else:
        describe = str
    rows = []
    for i, name in enumerate(names):
        top = [{'class': c, 'label': describe(c), 'probability': p}
               for p, c in zip(probs[i].tolist(), indices[i].tolist())]
        rows.append({'image': name, 'top': top,
                     'true_label': describe(labels[i]) if labels and describe is not str else None})
    return rows


def _print_predictions(rows: Sequence[dict]) -> None:
    for row in rows:
        print(row['image'] + (f' (true: {row["true_label"]})' if row['true_label'] else ''))
        for entry in row['top']:
            print(f'    {entry["probability"]:6.1%}  {entry["label"]}')


def demo_zoo_table(out_dir: Path) -> None:
    """Demo step: the zoo table, also written to zoo.txt."""
    table = format_zoo(zoo())
    print(table)
    write_atomic(out_dir / 'zoo.txt', table + '\n')


def _demo_model() -> Tuple[nn.Module, str]:
    """FAN-T-ViT with its official weights if they can be fetched within a few seconds, else with random weights."""
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DEMO_WEIGHTS_TIMEOUT)
    try:
        return create_model(DEMO_MODEL, pretrained=True), 'official weights (nv_in1k)'
    except UserError as error:
        print(f'official weights not available ({str(error)[:200]}): using RANDOM weights, so the predictions '
              f'mean nothing; the pipeline is the same')
        torch.manual_seed(0)
        return create_model(DEMO_MODEL), 'RANDOM weights'
    finally:
        socket.setdefaulttimeout(previous)


def demo_classify_photos(out_dir: Path) -> None:
    """Demo step: FAN-T-ViT on the bundled photos (official weights when they can be downloaded)."""
    photos = bundled_photos()
    model, weights = _demo_model()
    probs, indices = classify(model, [p.image for p in photos])
    print(f'{DEMO_MODEL} with {weights} on {len(photos)} bundled photos:')
    rows = _predictions([p.name for p in photos], probs, indices, model.num_classes, [p.label for p in photos])
    _print_predictions(rows)
    write_json(out_dir / 'predictions.json', {'model': DEMO_MODEL, 'weights': weights, 'predictions': rows})


def shipped_fashion_mnist_models() -> List[str]:
    """The FAN models whose Fashion-MNIST weights ship in the package, best test top-1 first."""
    shipped = [name for name in fan_models() if packaged_weights(name)]
    return sorted(shipped, key=lambda name: -packaged_weights_record(packaged_weights(name))['test_top1'])


def demo_fashion_mnist(out_dir: Path) -> None:
    """Demo step: the best FAN micro model with the Fashion-MNIST weights trained by this project (offline), on the
    10,000 real test images when the dataset is installed, else on the ten test images that ship with the package."""
    shipped = shipped_fashion_mnist_models()
    if not shipped:
        raise UserError('no Fashion-MNIST weights ship with this package (fan/weights/ is empty)')
    name = f'{shipped[0]}.{FASHION_MNIST_TAG}'
    record = packaged_weights_record(packaged_weights(shipped[0]))
    model = create_model(name, pretrained=True)
    try:
        dataset = load_fashion_mnist()
        images = [Image.fromarray(image.numpy(), 'L') for image in dataset.test_images]
        names, labels = [f'test image {i}' for i in range(len(images))], dataset.test_labels.tolist()
        source = f'the {len(images):,} Fashion-MNIST test images (Debian\'s dataset-fashion-mnist)'
    except MissingPathError as missing:
        print(f'{missing}; using the ten test images that ship with the package')
        names, images, labels = map(list, zip(*bundled_samples()))
        source = 'the ten Fashion-MNIST test images that ship with the package'
    probs, indices = zip(*(classify(model, images[i:i + 500], top_k=3) for i in range(0, len(images), 500)))
    probs, indices = torch.cat(probs), torch.cat(indices)
    accuracy = (indices[:, 0] == torch.tensor(labels)).float().mean().item()
    print(f'{name}: weights trained by this project ({record["dataset"]}, seed {record["seed"]}; its card states '
          f'test top-1 {record["test_top1"]:.4f}) on {source}: top-1 {accuracy:.4f}')
    rows = _predictions(names, probs, indices, model.num_classes, labels, FASHION_MNIST_CLASSES)
    _print_predictions(rows[:8])
    write_json(out_dir / 'fashion_mnist_predictions.json',
               {'model': name, 'weights': 'fashion_mnist (shipped, trained by this project)', 'images': source,
                'top1': accuracy, 'predictions': rows})


def _list(args: argparse.Namespace) -> int:
    entries = zoo(args.filter)
    if not entries:
        raise UserError(f'no FAN model matches {args.filter!r}')
    print(format_zoo(entries))
    return 0


def _predict(args: argparse.Namespace) -> int:
    model = model_from_args(args, resolve_device(args.device))
    if args.images:  # files and folders (every image below them); unreadable ones skipped and named
        loaded = read_images(image_files(args.images), 'predict')
        names, images, labels = [str(path) for path, _ in loaded], [image for _, image in loaded], None
    else:
        photos = bundled_photos()
        names, images, labels = [p.name for p in photos], [p.image for p in photos], [p.label for p in photos]
    fashion_mnist = getattr(model, 'pretrained_cfg', {}).get('tag') == FASHION_MNIST_TAG
    class_names = FASHION_MNIST_CLASSES if fashion_mnist else None
    if fashion_mnist:
        labels = None  # (the bundled photos' labels are ImageNet classes)
    rows = []
    for start in range(0, len(images), args.batch_size):
        probs, indices = classify(model, images[start:start + args.batch_size], args.top_k, args.precision)
        rows += _predictions(names[start:start + args.batch_size], probs, indices, model.num_classes,
                             labels[start:start + args.batch_size] if labels else None, class_names)
    _print_predictions(rows)
    path = write_json(args.out / 'predictions.json', {'model': args.model, 'predictions': rows})
    print(f'written: {path}')
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser('list', help='list the FAN models: params, official weights, licence')
    parser.add_argument('--filter', default='*', help='model name pattern, e.g. "fan_tiny*" (default: all)')
    parser.set_defaults(func=_list)

    parser = subparsers.add_parser('predict', help='classify images (default: the bundled photos)')
    add_model_options(parser, default=DEMO_MODEL)
    parser.add_argument('--top-k', type=positive_int, default=5, help='classes shown per image (default: %(default)s)')
    parser.add_argument('images', nargs='*', type=Path, metavar='IMAGE_OR_FOLDER',
                        help='image files, or folders of them (default: the six photos that come with the package)')
    add_out_option(parser, 'predict-out')
    add_run_options(parser, batch_size=16, workers=False, seed=None)
    parser.set_defaults(func=_predict)
