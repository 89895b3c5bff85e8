"""Model size and compute: parameter counts and fvcore multiply-add counts with the attention matmuls visible.

The unit is fvcore's: one "flop" is one multiply-add, so ``gmacs`` is what timm's benchmark CSVs call ``gmacs``
(and what FAN and most papers call "GFLOPs"). fvcore counts matmuls, convolutions, norms and adaptive pooling and
skips element-wise ops, softmax and GELU.
"""
import warnings
from typing import Any, Tuple

import torch
import torch.nn as nn

from ..factory import create_model

__all__ = ['count_params', 'fvcore_gmacs', 'count_gmacs']


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def fvcore_gmacs(model: nn.Module, input_size: Tuple[int, int, int]) -> float:
    """fvcore multiply-adds (G) of one forward pass on one image of ``input_size`` (C, H, W), on the CPU.

    The count is what the model's forward actually runs: attention built with fused
    ``F.scaled_dot_product_attention`` (which fvcore cannot see) contributes nothing; use :func:`count_gmacs`.
    """
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # importing fvcore.nn scripts a loss (deprecated); tracer warnings
        from fvcore.nn import FlopCountAnalysis  # slow import: only when counting
        analysis = FlopCountAnalysis(model, torch.zeros(1, *input_size))
        # element-wise ops, softmax, GELU ... are counted as 0 by design: do not log each of them
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9


def count_gmacs(model_name: str, input_size: Tuple[int, int, int], **model_kwargs: Any) -> float:
    """fvcore multiply-adds (G) per image of ``model_name`` at ``input_size`` (C, H, W), attention counted.

    Builds a fresh CPU copy with ``exportable=True``: timm then builds its attention layers without fused attention
    (the Q K^T and attention x V matmuls become explicit, so fvcore counts them, as timm's published ``gmacs`` do).
    The setting only applies while the model is built; timm's global fused-attention setting is left as it was.
    """
    model = create_model(model_name, exportable=True, **model_kwargs)
    return fvcore_gmacs(model, input_size)
