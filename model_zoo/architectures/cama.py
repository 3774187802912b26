"""CAMA (Class Activation Maps Augmentation, CVPR 2019, Fig. 2): a shared trunk and N ordered branches.

Each branch has its own copy of the backbone's last stage, an optional 1x1 reduction to D channels, a
BatchNorm over the map (F = BN(T), eq. 3) and a bias-free classifier W. Class scores are W . GAP(F), which
equals GAP(M) with M = W . F the class activation map (eq. 4); only M_t, the target class's map, is built,
for the overlapped activation penalty. N = 1 is the IDE+BN baseline.
"""

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput, class_activation_maps
from model_zoo.registry import ARCHITECTURE_REGISTRY, BACKBONE_REGISTRY


class CAMABranch(nn.Module):
    def __init__(self, stage: nn.Module, in_channels: int, num_classes: int, reduction_dim: Optional[int]):
        super().__init__()
        self.stage = stage
        dim = reduction_dim or in_channels
        self.reduction = nn.Conv2d(in_channels, dim, 1, bias=False) if reduction_dim else nn.Identity()
        self.bn = nn.BatchNorm2d(dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        return self.bn(self.reduction(self.stage(shared)))


class CAMA(nn.Module):
    feature_maps_kind = "activations"  # F^i are the branches' BN maps (contract: reid.feature_maps_kind)

    def __init__(
        self,
        backbone: str,
        num_branches: int,
        num_classes: int,
        reduction_dim: Optional[int] = None,
        pretrained: Optional[str] = None,
        ibn: bool = False,
        last_stride: int = 1,
    ):
        super().__init__()
        if num_branches < 1:
            raise ValueError("num_branches must be at least 1")
        parts = BACKBONE_REGISTRY.get(backbone)(pretrained, ibn=ibn, last_stride=last_stride)
        self.normalize = InputNormalization()
        self.trunk = parts.trunk
        self.branches = nn.ModuleList(
            CAMABranch(copy.deepcopy(parts.last_stage), parts.out_channels, num_classes, reduction_dim)
            for _ in range(num_branches)
        )
        self.stride = parts.stride

    def parameter_groups(self):
        """``classifiers``: the W^i alone, which CAMA's warm-up trains first (section 4.2)."""
        return {"classifiers": [branch.classifier for branch in self.branches]}

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        shared = self.trunk(self.normalize(images))
        maps = torch.stack([branch(shared) for branch in self.branches], dim=1)
        if not self.training:
            return ReIDOutput(feature_maps=maps)
        gap = maps.float().mean(dim=(3, 4))
        logits = torch.stack([branch.classifier(gap[:, i]) for i, branch in enumerate(self.branches)], dim=1)
        return ReIDOutput(feature_maps=maps, logits=logits)

    def target_activation_maps(self, feature_maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """M^i_t = W^i_t . F^i for each image's target class t (eq. 4): [B, N, h, w]."""
        weights = torch.stack([branch.classifier.weight[targets] for branch in self.branches], dim=1)
        return class_activation_maps(feature_maps, weights)

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """The paper's per-branch descriptors computed directly, [B, N, D]: GAP of each branch's map (section 3.3)."""
        shared = self.trunk(self.normalize(images))
        return torch.stack([F.adaptive_avg_pool2d(branch(shared), 1).flatten(1) for branch in self.branches], dim=1)


@ARCHITECTURE_REGISTRY.register("cama")
def build_cama(model_cfg: dict, num_classes: int) -> CAMA:
    return CAMA(
        backbone=model_cfg["backbone"],
        num_branches=model_cfg["num_branches"],
        num_classes=num_classes,
        reduction_dim=model_cfg.get("reduction_dim"),
        pretrained=model_cfg.get("pretrained"),
        ibn=model_cfg.get("ibn", False),
        last_stride=model_cfg.get("last_stride", 1),
    )
