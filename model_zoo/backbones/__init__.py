"""Backbones in plain torch with torchvision-compatible state-dict keys.

Each backbone is registered in ``BACKBONE_REGISTRY`` as
``build(pretrained: str | None, ibn: bool = False, last_stride: int = 1) -> BackboneParts``:
the full torchvision-layout network is built, the user's checkpoint is loaded into it (so torchvision and
timm files, and torchreid's for OSNet, load unchanged), and then it is split into the shared trunk and the last stage
that every
branch copies. ``ibn`` turns on IBN-a in the early blocks (``ibn.py``) without changing any key.
"""

from model_zoo.backbones.base import BackboneParts
from model_zoo.backbones import mobilenetv2, osnet, resnet  # noqa: F401  (registration)

__all__ = ["BackboneParts"]
