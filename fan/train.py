"""``fan train``: the paper's training recipes on timm's training components, on one CPU or many GPUs with torchrun.

timm's own ``train.py`` is not installed with timm and cannot see the FAN models; this is the same loop, built from
timm's parts: ``create_dataset`` / ``create_transform`` (RandAugment, random erasing), ``Mixup`` / CutMix or
:class:`fan.augment.SmoothMix`, label smoothing / soft-target losses, ``create_optimizer_v2`` (layer-wise decay
option), ``create_scheduler_v2`` (cosine with warm-up, stepped per update), ``ModelEmaV3``, autocast (a loss scaler
for fp16), gradient clipping, drop-path, gradient checkpointing and channels-last.

``--recipe paper`` (the default for FAN models) takes the official settings of the variant (:data:`RECIPES`, read
from the official ``scripts/``) and scales the learning rate linearly from the paper's global batch of 1024 to the
run's; ``--recipe none`` leaves everything to the flags; any flag given overrides the recipe.

Outputs in ``--out``: ``args.yaml``, ``summary.csv`` (timm's columns), ``last.pth.tar`` after every epoch (timm's
checkpoint layout; ``args`` is a plain dict so that ``weights_only`` loading works) and ``model_best.pth.tar``; only
rank 0 writes. ``--resume`` continues from ``last.pth.tar``. Every epoch draws its randomness from ``seed`` and the
epoch, so with ``-j 0`` a resumed run ends with exactly the weights of an uninterrupted one.
"""
import argparse
import ast
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import yaml
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import Compose
from tqdm import tqdm

from .augment import SmoothMix
from .data import fashion_mnist
from .distributed import DistributedContext, distributed_context
from .errors import MissingPathError, UserError
from .factory import resolve_data_config
from .io import ImageMode, save_torch, write_atomic, write_csv
from .options import (add_data_option, add_model_options, add_out_option, add_run_options, autocast, model_from_args,
                      non_negative_float, non_negative_int, positive_float, positive_int, probability,
                      seed_everything, uses_fast_modules)

__all__ = ['Recipe', 'RECIPES', 'PAPER_GLOBAL_BATCH', 'SUMMARY_COLUMNS', 'resolve_settings', 'train']

PAPER_GLOBAL_BATCH = 1024  # the official scripts' 4 nodes x 8 GPUs x 32 (FAN-T-Hybrid); see docs/training.md
SUMMARY_COLUMNS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')


@dataclass(frozen=True)
class Recipe:
    """One variant's official ImageNet-1K settings (``scripts/fan_*/*.sh``); the shared ones are the defaults."""
    lr: float  # at the paper's global batch of 1024
    warmup_epochs: int
    drop_path: float
    reprob: float
    per_gpu_batch: int  # of the official scripts (8 GPUs per node), for reference
    epochs: int = 300
    opt: str = 'adamw'
    weight_decay: float = 0.05
    sched: str = 'cosine'
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    model_ema: bool = True
    ema_decay: float = 0.99992
    aa: str = 'rand-m9-mstd0.5-inc1'
    remode: str = 'pixel'
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    drop: float = 0.0
    img_size: int = 224
    precision: str = 'bf16'  # the scripts' --amp (fp16 with a scaler on their GPUs; bf16 needs no scaler)


RECIPES: Dict[str, Recipe] = {
    'fan_tiny_12_p16_224': Recipe(2.0e-3, 5, 0.0, 0.25, 128),
    'fan_small_12_p16_224': Recipe(2.0e-3, 5, 0.2, 0.25, 32),
    'fan_base_18_p16_224': Recipe(2.0e-3, 5, 0.35, 0.3, 64),
    'fan_large_24_p16_224': Recipe(1.0e-3, 5, 0.3, 0.3, 32),
    'fan_small_12_p16_224_se_attn': Recipe(2.0e-3, 10, 0.3, 0.25, 64),
    'fan_tiny_8_p4_hybrid': Recipe(1.0e-3, 5, 0.1, 0.3, 32),
    'fan_small_12_p4_hybrid': Recipe(4.0e-3, 5, 0.25, 0.3, 64),
    'fan_base_16_p4_hybrid': Recipe(4.0e-3, 10, 0.35, 0.3, 64),
    'fan_large_16_p4_hybrid': Recipe(4.0e-3, 10, 0.45, 0.3, 64),
    'fan_xlarge_16_p4_hybrid': Recipe(1.0e-3, 20, 0.45, 0.3, 16),
    'fan_swin_tiny_patch4_window7_224': Recipe(5.0e-4, 5, 0.3, 0.25, 32),
    'fan_swin_small_patch4_window7_224': Recipe(5.0e-4, 5, 0.3, 0.25, 32),
    'fan_swin_base_patch4_window7_224': Recipe(2.0e-3, 10, 0.2, 0.25, 16),
    'fan_swin_large_patch4_window7_224': Recipe(1.0e-3, 5, 0.2, 0.25, 16),
}
# --recipe none: plain training, every augmentation off unless asked for
PLAIN = dict(epochs=10, lr=1e-3, opt='adamw', weight_decay=0.05, sched='cosine', warmup_epochs=0, warmup_lr=1e-6,
             min_lr=1e-6, model_ema=False, ema_decay=0.9998, aa=None, reprob=0., remode='pixel', mixup=0., cutmix=0.,
             smoothing=0., drop=0., drop_path=0., img_size=None, precision='fp32')
RECIPE_KEYS = tuple(PLAIN)


# ----------------------------------------------------------------------------------------------- settings

def resolve_settings(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """The run's settings: the recipe's (or the plain defaults), overridden by every flag given; the paper
    recipe's learning rate scaled linearly to the run's global batch unless ``--lr`` is given."""
    arch = args.model.split('.')[0]
    recipe = args.recipe or ('paper' if arch in RECIPES else 'none')
    if recipe == 'paper' and arch not in RECIPES:
        raise UserError(f'no paper recipe for {arch}; the FAN models have one (--recipe none for others)')
    settings = dict(PLAIN)
    notes = []
    if recipe == 'paper':
        settings.update({k: v for k, v in asdict(RECIPES[arch]).items() if k in settings})
    global_batch = args.batch_size * world_size
    for key in RECIPE_KEYS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if recipe == 'paper' and args.lr is None:
        paper_lr = RECIPES[arch].lr
        settings['lr'] = paper_lr * global_batch / PAPER_GLOBAL_BATCH
        notes.append(f'lr {paper_lr:g} at the paper\'s global batch {PAPER_GLOBAL_BATCH} -> {settings["lr"]:.3g} at '
                     f'global batch {global_batch} ({args.batch_size} x {world_size} process(es); linear scaling)')
    if args.smoothmix and (args.mixup is not None or args.cutmix is not None):
        raise UserError('--smoothmix replaces Mixup / CutMix: leave out --mixup and --cutmix')
    settings.update(recipe=recipe, global_batch=global_batch, notes=notes)
    return settings


# ----------------------------------------------------------------------------------------------- data

class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank`` (no padding, no duplicates), in a per-epoch seeded order."""

    def __init__(self, size: int, rank: int, world_size: int, shuffle: bool, seed: int):
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _datasets(args: argparse.Namespace, settings: Dict[str, Any], data_config: Dict[str, Any]):
    """(train set, validation set, classes). Images reach the transforms in the model's mode (RGB, or L for a
    1-channel model): timm's torch datasets hand over torchvision's images as they are (Fashion-MNIST: greyscale).
    Fashion-MNIST is read from Debian's package or ``--data`` (``fan.data.fashion_mnist``) and normalised with its
    own mean and std."""
    root = Path(args.data)
    if args.dataset == 'torch/fashion_mnist':
        root = fashion_mnist.fashion_mnist_root(root)
        channels = data_config['input_size'][0]
        data_config = dict(data_config, mean=fashion_mnist.MEAN * channels, std=fashion_mnist.STD * channels)
    if not args.dataset and not root.is_dir():
        raise MissingPathError(f'dataset folder not found: {root}')
    if not args.dataset:
        missing = [split for split in ('train', 'val') if not (root / split).is_dir()]
        if missing:
            raise MissingPathError(f'incomplete dataset {root}: no {" or ".join(missing)} folder '
                                   '(expected DATA/train/<class>/* and DATA/val/<class>/*)')
    train_transform = create_transform(
        data_config['input_size'], is_training=True, auto_augment=settings['aa'], re_prob=settings['reprob'],
        re_mode=settings['remode'], interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'])
    eval_transform = create_transform(**data_config)
    train = create_dataset(args.dataset, root=str(root), split='train', is_training=True)
    val = create_dataset(args.dataset, root=str(root), split='val' if not args.dataset else 'validation')
    mode = ImageMode.for_channels(data_config['input_size'][0])
    train.transform, val.transform = Compose([mode, train_transform]), Compose([mode, eval_transform])
    classes = _num_classes(train)
    if classes < 2:
        raise UserError(f'{root / "train"}: training needs at least two classes, found {classes}')
    return train, val, classes


def _num_classes(dataset) -> int:
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    return len({int(target) for _, target in getattr(reader, 'samples', [])})


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Each epoch's randomness (augmentation, mixing, dropout, drop-path) comes from the seed and the epoch alone."""
    seed_everything(seed + 1000 * epoch + rank)


# ----------------------------------------------------------------------------------------------- the loop

SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'rsqrt', 'constant')  # timm's


def _optimizer_name(name: str) -> str:
    """``--opt``: a name timm's ``create_optimizer_v2`` knows (its optional ``lookahead_`` prefix allowed)."""
    import timm.optim

    if name.lower().removeprefix('lookahead_') not in timm.optim.list_optimizers():
        raise argparse.ArgumentTypeError(f'unknown optimizer {name!r} (timm.optim.list_optimizers() lists them)')
    return name


def _model_kwargs(pairs: Optional[List[str]]) -> Dict[str, Any]:
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition('=')
        if not sep:
            raise UserError(f'--model-kwargs takes KEY=VALUE items, got {pair!r}')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _evaluate(model: nn.Module, loader: DataLoader, context: DistributedContext, precision: str) -> Dict[str, float]:
    model.eval()
    totals = [0., 0., 0., 0.]  # loss sum, top-1 hits, top-5 hits, images
    with torch.no_grad(), autocast(precision, context.device)():
        for images, targets in loader:
            images, targets = images.to(context.device), targets.to(context.device)
            logits = model(images).float()
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = targets.shape[0]
            totals = [totals[0] + float(nn.functional.cross_entropy(logits, targets, reduction='sum')),
                      totals[1] + float(top1) * n / 100, totals[2] + float(top5) * n / 100, totals[3] + n]
    loss, top1, top5, count = context.sum(totals)
    return {'eval_loss': loss / count, 'eval_top1': 100 * top1 / count, 'eval_top5': 100 * top5 / count}


def _plain(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != 'func'}


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run ``fan train`` with parsed arguments (under torchrun: in its process group); returns the last summary row."""
    with distributed_context(args.device) as context:
        return _train(args, context)


def _train(args: argparse.Namespace, context: DistributedContext) -> Dict[str, Any]:
    settings = resolve_settings(args, context.world_size)
    if context.device.type == 'cpu' and args.precision is None and settings['precision'] != 'fp32':
        settings['precision'] = 'fp32'  # CPUs without bf16 matrix units run bf16 slower than fp32
        settings['notes'].append('the paper trained in mixed precision on GPUs; on the CPU the run is fp32 '
                                 '(--precision bf16 to change that)')
    out = Path(args.out)
    last_path = out / 'last.pth.tar'
    if args.resume and not last_path.is_file():
        raise MissingPathError(f'nothing to resume: {last_path} not found')
    _seed_epoch(args.seed, 0, 0)  # the same initial weights on every rank

    model = model_from_args(args, optimize=uses_fast_modules(args, context.device), drop_rate=settings['drop'],
                            drop_path_rate=settings['drop_path'],
                            **_model_kwargs(args.model_kwargs))
    data_config = resolve_data_config(model, img_size=settings['img_size'])
    train_set, val_set, num_classes = _datasets(args, settings, data_config)
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)  # a new head for the dataset's classes (fine-tuning)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.sync_bn and context.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(context.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = create_optimizer_v2(model, opt=settings['opt'], lr=settings['lr'],
                                    weight_decay=settings['weight_decay'], layer_decay=args.layer_decay)
    train_sampler = ShardSampler(len(train_set), context.rank, context.world_size, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, num_workers=args.workers,
                              drop_last=len(train_sampler) > args.batch_size, pin_memory=context.device.type == 'cuda',
                              persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers,
                            sampler=ShardSampler(len(val_set), context.rank, context.world_size, False, args.seed))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=settings['sched'], num_epochs=settings['epochs'], warmup_epochs=settings['warmup_epochs'],
        warmup_lr=settings['warmup_lr'], min_lr=settings['min_lr'], step_on_epochs=False,
        updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=settings['ema_decay']) if settings['model_ema'] else None
    scaler = NativeScaler(device=context.device.type) if settings['precision'] == 'fp16' else None

    mixing = None
    if args.smoothmix:
        mixing = SmoothMix(mask=args.smoothmix, label_smoothing=settings['smoothing'], num_classes=num_classes)
    elif settings['mixup'] > 0 or settings['cutmix'] > 0:
        mixing = Mixup(mixup_alpha=settings['mixup'], cutmix_alpha=settings['cutmix'],
                       label_smoothing=settings['smoothing'], num_classes=num_classes)
    if mixing is not None:
        train_loss_fn = SoftTargetCrossEntropy()
    elif settings['smoothing'] > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(settings['smoothing'])
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    start_epoch, rows, best = 0, [], None
    if args.resume:
        checkpoint = torch.load(last_path, map_location='cpu', weights_only=True)
        if checkpoint['arch'] != model.pretrained_cfg.get('architecture', args.model.split('.')[0]):
            raise UserError(f'{last_path} trains {checkpoint["arch"]}, not {args.model}')
        model.load_state_dict(checkpoint['state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        if ema is not None and checkpoint.get('state_dict_ema') is not None:
            ema.module.load_state_dict(checkpoint['state_dict_ema'])
        if scaler is not None and 'scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['scaler'])
        start_epoch, rows, best = checkpoint['epoch'], checkpoint['summary'], checkpoint.get('best_top1')

    train_model = DistributedDataParallel(model) if context.world_size > 1 else model
    autocast_context = autocast(settings['precision'], context.device)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / 'args.yaml', yaml.safe_dump({**_plain(args), 'resolved': {
            k: v for k, v in settings.items()}}, sort_keys=False))
        for note in settings['notes']:
            print(note)
        print(f'{args.model}: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, '
              f'{num_epochs} epochs, recipe {settings["recipe"]}, {context.world_size} process(es) on {context.device}'
              + (f', resuming after epoch {start_epoch}' if start_epoch else ''))

    for epoch in range(start_epoch, num_epochs):
        _seed_epoch(args.seed, epoch, context.rank)
        train_sampler.set_epoch(epoch)
        train_model.train()
        updates = epoch * len(train_loader)
        loss_sum, seen = 0., 0
        bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{num_epochs}', leave=False, disable=not context.is_main)
        started = time.perf_counter()
        for images, targets in bar:
            images, targets = images.to(context.device), targets.to(context.device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixing is not None:
                images, targets = mixing(images, targets)
            with autocast_context():
                loss = train_loss_fn(train_model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters())
            else:
                loss.backward()
                if args.clip_grad is not None:
                    dispatch_clip_grad(model.parameters(), args.clip_grad)
                optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            if ema is not None:
                ema.update(model, step=updates)
            loss_sum, seen = loss_sum + float(loss.detach()) * images.shape[0], seen + images.shape[0]
            bar.set_postfix(loss=f'{loss_sum / seen:.4f}')
        scheduler.step(epoch + 1)
        loss_total, count = context.sum([loss_sum, seen])
        metrics = _evaluate(ema.module if ema is not None else model, val_loader, context, settings['precision'])
        row = {'epoch': epoch, 'train_loss': loss_total / count, **metrics,
               'lr': optimizer.param_groups[0]['lr']}
        rows.append(row)
        improved = best is None or row['eval_top1'] > best
        best = row['eval_top1'] if improved else best
        if context.is_main:
            state = {'epoch': epoch + 1, 'arch': model.pretrained_cfg.get('architecture', args.model.split('.')[0]),
                     'state_dict': model.state_dict(),
                     'state_dict_ema': ema.module.state_dict() if ema is not None else None,
                     'optimizer': optimizer.state_dict(), 'version': 2, 'metric': row['eval_top1'],
                     'best_top1': best, 'summary': rows, 'args': _plain(args)}
            if scaler is not None:
                state['scaler'] = scaler.state_dict()
            if improved:  # before last: a kill between the two leaves a resume that redoes this epoch and its best
                save_torch(out / 'model_best.pth.tar', {k: v for k, v in state.items() if k != 'optimizer'})
            save_torch(last_path, state)
            write_csv(out / 'summary.csv', rows, SUMMARY_COLUMNS)
            print(f'epoch {epoch + 1}/{num_epochs}: train loss {row["train_loss"]:.4f}, eval loss '
                  f'{row["eval_loss"]:.4f}, top-1 {row["eval_top1"]:.2f} %, top-5 {row["eval_top5"]:.2f} %, '
                  f'lr {row["lr"]:.3g}, {time.perf_counter() - started:.1f} s' + (' (best)' if improved else ''),
                  flush=True)
    return rows[-1] if rows else {}


def _run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'train', help='train or fine-tune with the paper\'s recipes on timm\'s components (CPU, GPU, torchrun)',
        description='Train on DATA/train and evaluate on DATA/val (class folders, or a timm dataset name with '
                    '--dataset). --recipe paper (default for FAN models) applies the official settings, scaling the '
                    'learning rate to the global batch; any flag given overrides the recipe. Under torchrun: '
                    'DistributedDataParallel, nccl on GPUs, gloo on the CPU.')
    add_model_options(parser, num_classes=False, img_size=False)
    parser.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                        help='more model constructor arguments, e.g. depth=2')
    add_data_option(parser, 'dataset root with train/ and val/ class folders')
    parser.add_argument('--dataset', default='', help="a timm dataset name instead of folders (e.g. 'torch/cifar10')")
    add_out_option(parser, 'train-out')
    parser.add_argument('--recipe', choices=('paper', 'none'),
                        help='paper: the official settings of the model (default for FAN models); none: the flags only')
    parser.add_argument('--resume', action='store_true', help='continue from OUT/last.pth.tar')
    recipe = parser.add_argument_group('recipe settings (default: the recipe\'s)')
    recipe.add_argument('--epochs', type=positive_int)
    recipe.add_argument('--img-size', type=positive_int)
    recipe.add_argument('--lr', type=positive_float, help='learning rate for this run (no scaling)')
    recipe.add_argument('--opt', type=_optimizer_name, help='timm optimizer name, e.g. adamw, lamb, sgd')
    recipe.add_argument('--weight-decay', type=non_negative_float)
    recipe.add_argument('--sched', choices=SCHEDULERS, help='timm scheduler name, e.g. cosine, step')
    recipe.add_argument('--warmup-epochs', type=non_negative_int)
    recipe.add_argument('--warmup-lr', type=non_negative_float)
    recipe.add_argument('--min-lr', type=non_negative_float)
    recipe.add_argument('--model-ema', action=argparse.BooleanOptionalAction, help='keep an EMA of the weights')
    recipe.add_argument('--ema-decay', type=probability)
    recipe.add_argument('--aa', help="RandAugment policy, e.g. rand-m9-mstd0.5-inc1 ('' for none)")
    recipe.add_argument('--reprob', type=probability, help='random-erasing probability')
    recipe.add_argument('--remode', help='random-erasing mode')
    recipe.add_argument('--mixup', type=non_negative_float, help='Mixup alpha (0: off)')
    recipe.add_argument('--cutmix', type=non_negative_float, help='CutMix alpha (0: off)')
    recipe.add_argument('--smoothing', type=probability, help='label smoothing')
    recipe.add_argument('--drop', type=probability, help='dropout before the head')
    recipe.add_argument('--drop-path', type=probability, help='stochastic depth rate')
    recipe.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'),
                        help='autocast precision (fp16 with a loss scaler)')
    extra = parser.add_argument_group('more training options')
    extra.add_argument('--smoothmix', choices=('S', 'C'), help='SmoothMix with this mask instead of Mixup / CutMix')
    extra.add_argument('--layer-decay', type=positive_float, help='layer-wise learning-rate decay (fine-tuning)')
    extra.add_argument('--clip-grad', type=positive_float, help='clip the gradient norm to this value')
    extra.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in the backward pass')
    extra.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    extra.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across processes (GPUs)')
    add_run_options(parser, batch_size=32, precision=False)
    parser.set_defaults(func=_run)
