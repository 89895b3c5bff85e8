"""One process or many under ``torchrun``: the process group, this process's rank and device, and reductions.

Used by ``fan eval`` / ``fan eval-c`` and ``fan train``: gloo on the CPU, nccl on GPUs (one per local rank).
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List

import torch
import torch.distributed as dist

from .options import resolve_device

__all__ = ['DistributedContext', 'distributed_context']


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, values: List[float]) -> List[float]:
        """Element-wise sums of ``values`` over all processes."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()


@contextmanager
def distributed_context(device: str = 'auto') -> Iterator[DistributedContext]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA); leave it at the end."""
    device = resolve_device(device)
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        yield DistributedContext(0, 1, device)
        return
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()
