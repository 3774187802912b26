"""Torch re-ID architectures. Importing this package registers every architecture in ARCHITECTURE_REGISTRY.

To add one: write a new file here whose builder is decorated with
``@ARCHITECTURE_REGISTRY.register("name")`` and import it below. Its module must accept uint8 images
[B, H, W, 3] and return a ``ReIDOutput``; the trainer, the exporter and the service need no edit.
"""

from model_zoo.architectures.common import InputNormalization, ReIDOutput, build_model
from model_zoo.architectures import cama, casn, clpd, fmn, imported, imported_cama, pmm  # noqa: F401  (registration)

__all__ = ["InputNormalization", "ReIDOutput", "build_model"]
