"""Peak memory of a measurement: the CUDA allocator's peak, or the growth of the process's peak resident set."""
import resource
import sys

import torch

__all__ = ['PeakMemory']


def _max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2 ** 20 if sys.platform == 'darwin' else max_rss / 2 ** 10


class PeakMemory:
    """Peak memory used from construction on, in MiB.

    CUDA: the peak of memory held by tensors (``torch.cuda.max_memory_allocated``) above what was held at start.
    CPU: how far the process's peak resident set size (``getrusage().ru_maxrss``) rose above its value at start,
    i.e. weights, activations, gradients, optimizer state and library workspaces. The peak never goes down, so this
    is only the memory of one model when the process does nothing else: the benchmark runner measures each model
    and mode in a fresh child process.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            self._start = torch.cuda.memory_allocated(device) / 2 ** 20
        else:
            self._start = _max_rss_mib()

    def peak_mib(self) -> float:
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20 - self._start
        return _max_rss_mib() - self._start
