"""Pieces every architecture shares: the input normalisation, the output type, the embedding rule."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import model_zoo.backbones  # noqa: F401  (registers backbones)
from model_zoo.registry import ARCHITECTURE_REGISTRY

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalization(nn.Module):
    """uint8 RGB [B, H, W, 3] -> normalised float [B, 3, H, W]; part of the model so no client normalises twice."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return x * self.scale - self.shift


@dataclass
class ReIDOutput:
    """feature_maps: [B, N, D, h, w], the per-branch maps F^i; logits: [B, N, C] class scores per branch
    (training mode only: the classifiers are not part of an exported model); aux: whatever else an
    architecture's objective needs in training (named logits, vectors for metric losses, attention maps)."""

    feature_maps: torch.Tensor
    logits: Optional[torch.Tensor] = None
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def embedding(self) -> torch.Tensor:
        return embedding_from_maps(self.feature_maps)


def branch_features(feature_maps: torch.Tensor) -> torch.Tensor:
    """Per-branch L2-normalised GAP features, [B, N, D]."""
    return F.normalize(feature_maps.float().mean(dim=(3, 4)), dim=2)


def embedding_from_maps(feature_maps: torch.Tensor) -> torch.Tensor:
    """The concatenation of per-branch L2-normalised GAP features (CAMA section 3.3), [B, N*D]."""
    return branch_features(feature_maps).flatten(1)


def classifier_neck(dim: int, bn_neck: bool) -> nn.Module:
    """Between a descriptor and its identity classifier: nothing (the papers) or, with ``bn_neck`` (a deviation),
    a batch norm, so the identity loss sees the batch-normalised descriptor and the triplet term the raw one, as
    IDE+BN's head (Luo et al.'s BNNeck). Training only: the descriptor and the exported maps are the same either way."""
    return nn.BatchNorm1d(dim) if bn_neck else nn.Identity()


def parameter_groups(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """Named parts of a model that training phases make trainable, freeze or give their own learning rate:
    ``all`` plus whatever the architecture's ``parameter_groups()`` names (CAMA: ``classifiers``)."""
    own = model.parameter_groups() if hasattr(model, "parameter_groups") else {}
    return {"all": [model], **own}


def class_activation_maps(feature_maps: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """M = W_t . F per cell (CAMA eq. 4), in fp32: feature_maps [B, ..., D, h, w], class_weights [B, ..., D]
    (each image's target-class classifier row) -> [B, ..., h, w]."""
    return torch.einsum("b...dhw,b...d->b...hw", feature_maps.float(), class_weights.float())


def build_model(model_cfg: dict, num_classes: int) -> nn.Module:
    return ARCHITECTURE_REGISTRY.get(model_cfg["architecture"])(model_cfg, num_classes)
