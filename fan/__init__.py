"""FAN: Fully Attentional Networks for timm.

``import fan`` registers every FAN variant with timm, so ``timm.create_model('fan_tiny_12_p16_224')`` works
afterwards. :func:`fan.create_model` is the one way the package itself builds models: any timm model, with official
weights or any checkpoint file loaded safely through the model's checkpoint filter.
"""
__version__ = '0.2.0'

from .models import *  # noqa: F401,F403,E402  (registers the models with timm)
from .errors import UserError  # noqa: E402
from .factory import create_model, resolve_data_config  # noqa: E402
from .cpu import optimize, tune_malloc  # noqa: E402
