"""Timed steps: an inference step, a training step, and loops that time each step after a warm-up."""
import time
from typing import Callable, ContextManager, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['time_steps', 'time_interleaved', 'inference_step', 'train_step']


def time_steps(step: Callable[[], None], warmup: int, repeats: int, synchronize: Callable[[], None]) -> List[float]:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times, timing each; returns the step times (s).

    ``synchronize`` waits for queued device work (``torch.cuda.synchronize`` on CUDA) so a time covers the step.
    """
    return time_interleaved([step], warmup, repeats, synchronize)[0]


def time_interleaved(steps: Sequence[Callable[[], None]], warmup: int, repeats: int,
                     synchronize: Callable[[], None]) -> List[List[float]]:
    """:func:`time_steps` for several steps taking turns (a b a b ...): the step times of each, in order.

    Taking turns exposes every step to the same background load, which keeps their ratio meaningful on a shared
    machine where the absolute times drift.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}')
    for _ in range(warmup):
        for step in steps:
            step()
    synchronize()
    times: List[List[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, step_times in zip(steps, times):
            start = time.perf_counter()
            step()
            synchronize()
            step_times.append(time.perf_counter() - start)
    return times


def inference_step(
        model: nn.Module,
        images: torch.Tensor,
        autocast: Callable[[], ContextManager],
) -> Callable[[], None]:
    """One forward pass of ``images`` (B, C, H, W) in eval mode under ``torch.inference_mode``."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast():
            model(images)
    return step


def train_step(
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        autocast: Callable[[], ContextManager],
) -> Callable[[], None]:
    """One training step on ``images`` (B, C, H, W) and class indices ``targets`` (B,): zero the gradients,
    forward, cross-entropy, backward, optimizer step. (fp16 runs without loss scaling: it does not change the cost.)
    """
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(images)
        F.cross_entropy(logits.float(), targets).backward()
        optimizer.step()
    return step
