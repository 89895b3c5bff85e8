"""CPU acceleration on request: :func:`optimize` swaps fast modules into a plain FAN (or timm) model, and
:func:`tune_malloc` sets glibc's malloc for a process that allocates large activations over and over."""
from .malloc import GLIBC_TUNABLES, tune_malloc
from .optimize import optimize

__all__ = ['optimize', 'tune_malloc', 'GLIBC_TUNABLES']
