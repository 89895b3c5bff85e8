"""FAN model families; importing this package registers them with timm."""
from .fan import *  # noqa: F401,F403
from .fan_swin import *  # noqa: F401,F403
