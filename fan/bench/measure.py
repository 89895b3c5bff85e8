"""One measurement, in the process that runs it: build a model, time inference or a training step, read the peak.

``fan.bench.runner`` calls :func:`measure` in a fresh child process per model and mode, so the memory peak belongs
to that model alone. Importing this module imports torch, timm and the FAN models (the runner's child processes
start from a server that has imported it once).
"""
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import timm
from timm.optim import create_optimizer_v2

from ..factory import create_model
from ..options import PRECISIONS, autocast
from .flops import count_gmacs, count_params
from .memory import PeakMemory
from .throughput import inference_step, time_interleaved, time_steps, train_step
from ..errors import UserError

__all__ = [
    'BenchSettings', 'MODES', 'resolve_input_size', 'build_model', 'prepare_step', 'measure',
    'measure_interleaved',
]

MODES = ('infer', 'train')


@dataclass(frozen=True)
class BenchSettings:
    """How every model of a benchmark runs."""
    device: str = 'cpu'
    batch_size: int = 8
    img_size: Optional[int] = None  # None: the model's default input size
    dtype: str = 'fp32'  # 'fp32', or autocast to 'bf16' / 'fp16'
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    optimize: bool = False  # fan.optimize (the CPU fast modules)
    grad_checkpointing: bool = False  # training only: recompute activations in the backward pass
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    warmup: int = 2  # untimed steps
    repeats: int = 5  # timed steps; the median is reported

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise UserError(f'dtype must be one of {", ".join(PRECISIONS)}, got {self.dtype!r}')
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise UserError('batch_size and repeats must be at least 1, warmup at least 0')
        if self.compile and self.warmup < 1:
            raise UserError('compile needs a warm-up step: the first step compiles the model')


def resolve_input_size(model_name: str, img_size: Optional[int]) -> Tuple[Tuple[int, int, int], Dict[str, Any]]:
    """Input size (C, H, W) to benchmark ``model_name`` at, and the ``create_model`` kwargs that size needs.

    The default is the pretrained config's ``input_size`` (the training size; timm's benchmark uses the test size,
    which differs for a few models, e.g. convnext_tiny 288). Models with a fixed input size are rebuilt for another
    size (``img_size=``); the others just get larger or smaller images.
    """
    cfg = timm.get_pretrained_cfg(model_name)
    default = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    if img_size is None or default[1:] == (img_size, img_size):
        return default, {}
    kwargs = {'img_size': img_size} if cfg is not None and cfg.fixed_input_size else {}
    return (default[0], img_size, img_size), kwargs


def build_model(model_name: str, settings: BenchSettings) -> Tuple[nn.Module, Tuple[int, int, int], Dict[str, Any]]:
    """The model (random weights) on the device, in its memory format, with gradient checkpointing as set.

    Returns the model, its input size (C, H, W) and the extra ``create_model`` kwargs that size needed.
    """
    input_size, size_kwargs = resolve_input_size(model_name, settings.img_size)
    model = create_model(model_name, device=settings.device, optimize=settings.optimize, **size_kwargs)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, input_size, size_kwargs


def prepare_step(model_name: str, mode: str, settings: BenchSettings
                 ) -> Tuple[Callable[[], None], nn.Module, Tuple[int, int, int], Dict[str, Any]]:
    """Build ``model_name`` and one ``mode`` step on a random batch: (step, model, input size, create_model kwargs)."""
    if mode not in MODES:
        raise UserError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
    device = torch.device(settings.device)
    model, input_size, size_kwargs = build_model(model_name, settings)
    images = torch.randn(settings.batch_size, *input_size, device=device)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast_context = autocast(settings.dtype, device)
    runner = torch.compile(model) if settings.compile else model
    if mode == 'infer':
        return inference_step(runner, images, autocast_context), model, input_size, size_kwargs
    targets = torch.randint(0, model.num_classes, (settings.batch_size,), device=device)
    optimizer = create_optimizer_v2(model, opt='sgd', lr=1e-4)  # SGD, momentum 0.9: as timm's benchmark
    return train_step(runner, images, targets, optimizer, autocast_context), model, input_size, size_kwargs


def _start(settings: BenchSettings) -> Callable[[], None]:
    """Per-process set-up (threads, seed); returns the device synchronisation to call after a step."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    return torch.cuda.synchronize if settings.device.startswith('cuda') else lambda: None


def _throughput(mode: str, batch_size: int, step_times: List[float]) -> Dict[str, Any]:
    median_step = statistics.median(step_times)
    return {
        f'{mode}_samples_per_sec': batch_size / median_step,
        f'{mode}_step_ms': median_step * 1e3,
        f'{mode}_step_times_ms': [t * 1e3 for t in step_times],
    }


def measure(model_name: str, mode: str, settings: BenchSettings, count_flops: bool = False) -> Dict[str, Any]:
    """Measure ``model_name`` in ``mode`` ('infer' or 'train'); returns a flat result dict.

    Keys: ``{mode}_samples_per_sec`` (batch / median step time), ``{mode}_step_ms`` (median), ``{mode}_step_times_ms``
    (every timed step), ``{mode}_peak_mem_mib`` (see :class:`PeakMemory`: building the model, warm-up and timed steps),
    ``param_count``, ``img_size``, and with ``count_flops`` ``gmacs`` (fvcore, per image, attention counted; counted
    after the memory peak is read, on a separate CPU copy).
    """
    synchronize = _start(settings)
    memory = PeakMemory(torch.device(settings.device))
    step, model, input_size, size_kwargs = prepare_step(model_name, mode, settings)
    step_times = time_steps(step, settings.warmup, settings.repeats, synchronize)
    result = {
        'model': model_name,
        'param_count': count_params(model),
        'img_size': input_size[-1],
        **_throughput(mode, settings.batch_size, step_times),
        f'{mode}_peak_mem_mib': memory.peak_mib(),
    }
    if count_flops:
        del model, step
        result['gmacs'] = count_gmacs(model_name, input_size, **size_kwargs)
    return result


def measure_interleaved(model_names: Sequence[str], mode: str, settings: BenchSettings) -> Dict[str, Dict[str, Any]]:
    """Throughput of several models built side by side in this process, their steps taking turns; by model name.

    The models share the background load step by step, so the ratio of their throughputs holds on a busy machine.
    No memory figures (the models share the process): measure those with :func:`measure`, one process each.
    """
    synchronize = _start(settings)
    steps = [prepare_step(name, mode, settings)[0] for name in model_names]
    times = time_interleaved(steps, settings.warmup, settings.repeats, synchronize)
    return {name: _throughput(mode, settings.batch_size, t) for name, t in zip(model_names, times)}
