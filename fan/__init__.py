"""FAN: Fully Attentional Networks for timm.

``import fan`` registers every FAN variant with timm, so ``timm.create_model('fan_tiny_12_p16_224')``
works afterwards.
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)

__version__ = '0.1.0'
