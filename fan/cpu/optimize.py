"""``fan.optimize``: the CPU fast modules swapped into a model, in place, as an explicit step."""
from typing import Dict, Type

import torch.nn as nn
from timm.layers import Mlp
from timm.models.convnext import ConvNeXtBlock
from timm.models.swin_transformer import WindowAttention
from timm.models.xcit import ConvPatchEmbed

from ..layers import DwConvMlp, TokenMixing
from ..models.fan import HybridEmbed
from .modules import (
    FastConvStem, FastDepthwiseConv2d, FastDwConvMlp, FastGeluMlp, FastHybridEmbed, FastLinear, FastTokenMixing,
    FastWindowAttention,
)

__all__ = ['optimize']

# plain module class -> its fast subclass (matched by exact type: a user's own subclass is left alone)
_FAST_MODULES: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Linear: FastLinear,
    TokenMixing: FastTokenMixing,
    DwConvMlp: FastDwConvMlp,
    ConvPatchEmbed: FastConvStem,
    HybridEmbed: FastHybridEmbed,
    WindowAttention: FastWindowAttention,
}


def optimize(model: nn.Module) -> nn.Module:
    """Swap the CPU fast modules of :mod:`fan.cpu.modules` into ``model``, in place, and return it.

    Works like ``ipex.optimize`` for inference and training: each fast module is a subclass of the module it
    replaces, with the same parameters, buffers, sub-modules and hooks (the same objects), so ``state_dict``,
    optimizers, EMA copies and ``load_state_dict`` are unaffected, and it keeps no copy of any weight, so writes to
    the weights (``.data``, ``load_state_dict``, an optimizer step) show in the next output. Each fast forward runs
    its kernel only for plain eager CPU tensors in float32, or bfloat16 under CPU autocast, and falls back to the
    plain forward elsewhere: other devices and dtypes, ``torch.func`` transforms, ``torch.compile``, tracing and
    export, active dropout, and sub-modules that are not the plain ones (a ``SyncBatchNorm``, a quantized or pruned
    layer). Outputs equal the plain model's to float32 (bfloat16) rounding.

    What it gives up, so apply it after the changes that need them, or not at all:

    - hooks inside fused modules: forward hooks on the depthwise mixers (``mlp_v.dwconv`` and its parts) and on the
      ConvNeXt MLPs' ``fc1`` / ``act`` / ``fc2`` do not fire where the fused kernels run, nor on the ViT stem's
      convolutions and norms in inference, nor on FAN-Swin's ``qkv`` in bfloat16 inference;
    - ``torch.ao.quantization.quantize_dynamic``, which matches ``nn.Linear`` by exact type: quantize the plain model;
    - TorchScript: script, trace or export the plain model (``fan.create_model`` without ``optimize``).

    The ``fan`` commands apply it on the CPU unless ``--no-optimize`` is given.
    """
    for module in list(model.modules()):
        fast = _FAST_MODULES.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if type(module) is ConvNeXtBlock:  # the hybrids' ConvNeXt stages: the 7x7 depthwise conv and the GELU MLP
            if FastDepthwiseConv2d.fits(module.conv_dw):
                module.conv_dw.__class__ = FastDepthwiseConv2d
            if type(module.mlp) is Mlp:
                module.mlp.__class__ = FastGeluMlp
    return model
