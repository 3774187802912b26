"""FMN, the Feature Mask Network (Ding, Khan, Tang, Porikli 2017; design: shared/design/paper-family.md, 2).

Three parts:
- GRN, the global representation network: the whole backbone and an r-way classifier (with bias); its
  descriptor g is the GAP of its last stage.
- MN, the mixing network: m = exp(min(ReLU(W g + b), 10)) reshaped to the masked stage's h x w grid (eq. 1-2);
  m >= 1 everywhere, so the mask only amplifies. The clamp (exp(10) ~ 2.2e4) keeps it finite; ``aux`` counts
  how often it fires.
- LAN, the locally attentive network: a fresh ImageNet copy of the stages after the masked one (Algorithm 1:
  initialised from ImageNet, not from the trained GRN) on o = f * m, f the GRN's output at ``mask_layer``
  (pool1, the paper's best, is ``stem``); its descriptor l is the GAP of its last stage, with its own classifier.

Contract: N = 2 branches, F^1 = the GRN's last-stage map and F^2 = the LAN's (activations, D = the backbone's
width), whose GAPs are g and l exactly. The paper ranks by Euclidean distance on [0.5 g/|g|; 0.5 l/|l|], which
orders a gallery exactly as the mean of the two cosines does, so the service ranks FMN unchanged.
Training (``training/objectives/fmn.py``): phase 1 trains the GRN, phase 2 freezes it in eval mode and trains
MN and LAN on cross-entropy plus the probability-margin rank loss (eq. 5).
"""

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput, classifier_neck
from model_zoo.backbones.base import STAGE_NAMES
from model_zoo.registry import ARCHITECTURE_REGISTRY, BACKBONE_REGISTRY, MODEL_OPTIONS_REGISTRY, option, options_of

MASK_LOGIT_CLAMP = 10.0


@MODEL_OPTIONS_REGISTRY.register("fmn")
@dataclass
class FMNOptions:
    """The ``model.*`` keys only fmn reads."""

    mask_layer: str = option(
        "stem",
        "FMN: the stage whose output the feature mask multiplies (stem = ResNet's pool1); "
        "the LAN copies the stages after it",
    )


class FeatureMask(nn.Module):
    """MN: global descriptor [B, m] -> mask [B, 1, h, w] = exp(min(ReLU(W g + b), clamp)). Starts near 1
    everywhere (W ~ N(0, 1e-3), b = 0), so the LAN begins on unmasked features. Computed in fp32."""

    def __init__(self, in_features: int, grid: Tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.linear = nn.Linear(in_features, grid[0] * grid[1])
        nn.init.normal_(self.linear.weight, std=1e-3)
        nn.init.zeros_(self.linear.bias)

    def forward(self, descriptor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mask, share of cells whose logit hit the clamp)."""
        logits = torch.relu(self.linear(descriptor.float()))
        clamped = (logits > MASK_LOGIT_CLAMP).float().mean()
        mask = torch.exp(logits.clamp(max=MASK_LOGIT_CLAMP))
        return mask.view(-1, 1, *self.grid), clamped


class FMN(nn.Module):
    feature_maps_kind = "activations"

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        input_size: Tuple[int, int],
        mask_layer: str = "stem",
        pretrained=None,
        ibn: bool = False,
        last_stride: int = 1,
        bn_neck: bool = False,
    ):
        super().__init__()
        if mask_layer not in STAGE_NAMES[:-1]:
            raise ValueError(
                f"mask_layer {mask_layer!r}: one of {', '.join(STAGE_NAMES[:-1])} (the LAN is the stages after it)"
            )
        build = BACKBONE_REGISTRY.get(backbone)
        grn, fresh = (
            build(pretrained, ibn=ibn, last_stride=last_stride),
            build(pretrained, ibn=ibn, last_stride=last_stride),
        )
        after = STAGE_NAMES[STAGE_NAMES.index(mask_layer) + 1]
        self.normalize = InputNormalization()
        self.grn_local = grn.stage_range("stem", mask_layer)
        self.grn_global = grn.stage_range(after, "layer4")
        # bn_neck: a deviation, for diagnosis (FMN's GRN trailed IDE+BN, whose head has one)
        self.grn_neck = classifier_neck(grn.out_channels, bn_neck)
        self.lan_neck = classifier_neck(fresh.out_channels, bn_neck)
        self.grn_classifier = nn.Linear(grn.out_channels, num_classes)
        stride = grn.stage_strides[mask_layer]
        self.mask = FeatureMask(
            grn.out_channels, (math.ceil(input_size[0] / stride), math.ceil(input_size[1] / stride))
        )
        self.lan = fresh.stage_range(after, "layer4")
        self.lan_classifier = nn.Linear(fresh.out_channels, num_classes)
        self.stride = grn.stride

    def parameter_groups(self):
        """``grn`` (shared stem included: frozen in phase 2), ``mask`` (MN), ``lan``, ``classifiers`` (for a
        classifier warm-up); ``new`` = the layers not from ImageNet (classifiers and MN), for the paper's
        higher learning rate on new layers."""
        classifiers = [self.grn_neck, self.grn_classifier, self.lan_neck, self.lan_classifier]
        return {
            "grn": [self.grn_local, self.grn_global, self.grn_neck, self.grn_classifier],
            "mask": [self.mask],
            "lan": [self.lan, self.lan_neck, self.lan_classifier],
            "classifiers": classifiers,
            "new": [*classifiers, self.mask],
        }

    def global_branch(self, images: torch.Tensor):
        """(pool1-level features f, the GRN's last-stage map)."""
        local = self.grn_local(self.normalize(images))
        return local, self.grn_global(local)

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        local, global_map = self.global_branch(images)
        mask, clamped = self.mask(global_map.float().mean(dim=(2, 3)))
        lan_map = self.lan(local * mask.to(local.dtype))
        maps = torch.stack([global_map, lan_map], dim=1)
        if not self.training:
            return ReIDOutput(feature_maps=maps)
        gap = maps.float().mean(dim=(3, 4))
        logits = torch.stack(
            [self.grn_classifier(self.grn_neck(gap[:, 0])), self.lan_classifier(self.lan_neck(gap[:, 1]))], dim=1
        )
        return ReIDOutput(feature_maps=maps, logits=logits, aux={"mask": mask, "mask_clamped": clamped})

    def global_output(self, images: torch.Tensor) -> ReIDOutput:
        """The GRN alone (phase 1 trains nothing else): its map [B, 1, D, h, w] and logits [B, 1, C]."""
        _, global_map = self.global_branch(images)
        logits = self.grn_classifier(self.grn_neck(global_map.float().mean(dim=(2, 3)))).unsqueeze(1)
        return ReIDOutput(feature_maps=global_map.unsqueeze(1), logits=logits)

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """[g; l] as the paper computes them: GAPs of the GRN's and the LAN's last stages, [B, 2, D]."""
        local, global_map = self.global_branch(images)
        g = nn.functional.adaptive_avg_pool2d(global_map, 1).flatten(1)
        mask, _ = self.mask(g)
        local_descriptor = nn.functional.adaptive_avg_pool2d(self.lan(local * mask), 1).flatten(1)
        return torch.stack([g, local_descriptor], dim=1)


@ARCHITECTURE_REGISTRY.register("fmn")
def build_fmn(model_cfg: dict, num_classes: int) -> FMN:
    options = options_of(FMNOptions, model_cfg)
    if "input_size" not in model_cfg:
        raise ValueError("FMN's mask is a fixed grid: model_cfg needs input_size (height, width)")
    return FMN(
        backbone=model_cfg["backbone"],
        num_classes=num_classes,
        input_size=tuple(model_cfg["input_size"]),
        mask_layer=options.mask_layer,
        pretrained=model_cfg.get("pretrained"),
        ibn=model_cfg.get("ibn", False),
        last_stride=model_cfg.get("last_stride", 1),
        bn_neck=model_cfg.get("bn_neck", False),
    )
