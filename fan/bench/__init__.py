"""Benchmarks and model cards: what FAN and timm models cost (parameters, GMACs, peak memory, throughput).

``fan bench`` measures any timm models (:mod:`.runner`, one child process per model and mode), ``fan bench-peers``
compares FAN with XCiT of the same size (:mod:`.peers`), ``fan cards`` keeps ``models/*.json`` and the README zoo
table in step with the code (:mod:`.cards`).
"""
from .flops import count_gmacs, count_params, fvcore_gmacs
from .measure import BenchSettings, measure
from .runner import default_models, resolve_models, run_benchmark

__all__ = [
    'BenchSettings', 'count_gmacs', 'count_params', 'default_models', 'fvcore_gmacs', 'measure', 'resolve_models',
    'run_benchmark',
]
