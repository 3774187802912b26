"""PMM, Progressive Multi-stage feature Mix (Zhang, He, Sun, Li; design: shared/design/paper-family.md, 1).

A shared backbone (the last stage at stride 1, shared, not copied) gives x. Three stages, each a D-dim
(``reduction_dim``, 512 in the paper) descriptor u_s and a classifier y_s (with bias):
- stage I on x: GAP -> 1x1 conv -> BN -> ReLU;
- stages II and III on x_p = a fresh bottleneck (the "part trunk") applied to x: GMP -> linear -> BN -> ReLU.
In training, stage II sees x_p with the blocks that stage I's Grad-CAM ranks highest replaced by another
person's (A-Hard-Mix), and stage III sees x_p mixed by stage II's Grad-CAM; the mixing lives in the objective
(``training/objectives/pmm.py``), which hands ``forward`` a ``mix`` callable. At test time nothing is mixed.

Contract: N = 3 branches of D channels on x's grid, whose grid means are exactly u_1, u_2, u_3:
F^1 = ReLU-gate(BN(conv(x))) per cell (rules R1 + R7 of ``contract_maps``); F^2, F^3 = ReLU-gate(BN(linear(
selection_map(x_p)))) (R4 + R1 + R7): each channel of x_p contributes only at its maximum, so these maps are
attributions, not activations (``feature_maps_kind``), and RAM on them is spiky where GMP looked. The paper
ranks by Euclidean distance on [u_1; u_2; u_3]; the product ranks by the mean of the branch cosines.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput, classifier_neck
from model_zoo.architectures.contract_maps import (
    affine_map,
    as_affine,
    relu_gate,
    selected_values,
    selection_map,
    selection_margin,
)
from model_zoo.backbones.resnet import Bottleneck
from model_zoo.registry import ARCHITECTURE_REGISTRY, BACKBONE_REGISTRY, MODEL_OPTIONS_REGISTRY, option, options_of

# mix(stage input, that stage's logits, x_p) -> the next stage's input
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@MODEL_OPTIONS_REGISTRY.register("pmm")
@dataclass
class PMMOptions:
    """The ``model.*`` keys only pmm reads."""

    classifier_init_std: Optional[float] = option(
        None,
        "PMM: the stages' classifiers drawn from N(0, std) with zero "
        "bias (null: the authors' Kaiming fan_out; 0.001 as CAMA's)",
    )


def init_new_layer(module: nn.Module) -> None:
    """PMM's code: Kaiming (fan_in for convolutions, fan_out for linear layers), zero biases, BN weights ~ N(1,
    0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in" if isinstance(m, nn.Conv2d) else "fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class GlobalStage(nn.Module):
    """Stage I: GAP -> 1x1 conv (bias) -> BN -> ReLU = u -> [neck] -> linear (bias) = y."""

    def __init__(self, channels: int, dim: int, num_classes: int, bn_neck: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.neck = classifier_neck(dim, bn_neck)
        self.classifier = nn.Linear(dim, num_classes)
        init_new_layer(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        u = torch.relu(self.bn(self.conv(x.mean(dim=(2, 3), keepdim=True)))).flatten(1)
        return u, self.classifier(self.neck(u))

    def contract_map(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: the 1x1 conv and BN are affine per cell, so their per-cell map averages to their value
        on GAP(x); the ReLU becomes a gate on the pooled value."""
        return relu_gate(self.bn(self.conv(x)))


class MaxStage(nn.Module):
    """Stages II and III: GMP -> linear (bias) -> BN -> ReLU = u -> [neck] -> linear (bias) = y."""

    def __init__(self, channels: int, dim: int, num_classes: int, bn_neck: bool = False):
        super().__init__()
        self.linear = nn.Linear(channels, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.neck = classifier_neck(dim, bn_neck)
        self.classifier = nn.Linear(dim, num_classes)
        init_new_layer(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        u = torch.relu(self.bn(self.linear(x.amax(dim=(2, 3)))))
        return u, self.classifier(self.neck(u))

    def contract_map(self, x: torch.Tensor) -> torch.Tensor:
        selected = affine_map(selection_map(x, "max"), *as_affine(self.linear))
        return relu_gate(affine_map(selected, *as_affine(self.bn)))


class PMM(nn.Module):
    feature_maps_kind = "attribution"

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        dim: int = 512,
        pretrained: Optional[str] = None,
        ibn: bool = False,
        last_stride: int = 1,
        classifier_init_std: Optional[float] = None,
        bn_neck: bool = False,
    ):
        super().__init__()
        parts = BACKBONE_REGISTRY.get(backbone)(pretrained, ibn=ibn, last_stride=last_stride)
        channels = parts.out_channels
        self.normalize = InputNormalization()
        self.trunk, self.last_stage = parts.trunk, parts.last_stage
        self.stage1 = GlobalStage(channels, dim, num_classes, bn_neck)
        self.part = Bottleneck(channels, channels // Bottleneck.expansion)
        self.stage2 = MaxStage(channels, dim, num_classes, bn_neck)
        self.stage3 = MaxStage(channels, dim, num_classes, bn_neck)
        if classifier_init_std:
            # The authors' Kaiming classifiers start with logits spread ~0.6 over 1,462 people and cannot fit one
            # batch in a few steps; N(0, std) with a small std starts them near 0 and can (bench/classifier_uptake.py;
            # on the pool that alone did not make the warm-up learn: docs/results.md, PMM).
            for stage in (self.stage1, self.stage2, self.stage3):
                nn.init.normal_(stage.classifier.weight, std=classifier_init_std)
        self.stride = parts.stride

    def parameter_groups(self):
        stages = (self.stage1, self.stage2, self.stage3)
        return {
            "classifiers": [m for s in stages for m in (s.neck, s.classifier)],
            "backbone": [self.trunk, self.last_stage],
            "new": [*stages, self.part],
        }

    def _backbone(self, images: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.trunk(self.normalize(images)))

    def _maps(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._backbone(images)
        return x, self.part(x)

    def forward(self, images: torch.Tensor, mix: Optional[Mix] = None) -> ReIDOutput:
        """Eval: the contract maps. Training: logits [B, 3, C], the vectors u in ``aux["vectors"]`` [B, 3, D]
        (also as 1x1 ``feature_maps``, whose grid mean is the descriptor), stages II and III mixed by ``mix``."""
        if not self.training:
            x, part = self._maps(images)
            return ReIDOutput(
                feature_maps=torch.stack(
                    [self.stage1.contract_map(x), self.stage2.contract_map(part), self.stage3.contract_map(part)], dim=1
                )
            )
        x = self._backbone(images)
        if mix is not None and not x.requires_grad:
            x = x.detach().requires_grad_()  # Grad-CAM needs dScore/dx even while the backbone is frozen (a warm-up)
        part = self.part(x)
        u1, y1 = self.stage1(x)
        second = mix(x, y1, part) if mix else part
        u2, y2 = self.stage2(second)
        third = mix(second, y2, part) if mix else part
        u3, y3 = self.stage3(third)
        vectors = torch.stack([u1, u2, u3], dim=1)
        return ReIDOutput(
            feature_maps=vectors[..., None, None], logits=torch.stack([y1, y2, y3], dim=1), aux={"vectors": vectors}
        )

    def selection_margins(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, D], for the exporter's parity rule: how firmly each output channel's cells are chosen. Stage I
        selects nothing (inf). Stages II and III mix every GMP channel into every output channel, so each takes
        the smallest margin over x_p's channels; a channel whose maximum is exactly 0 (all ReLU zeros) adds 0
        wherever its spike lands and counts as decided."""
        _, part = self._maps(images)
        margins = selection_margin(part, "max").masked_fill(selected_values(part, "max") == 0, float("inf"))
        batch, dim = part.shape[0], self.stage2.linear.out_features
        undecided = margins.amin(dim=1)[:, None, None].expand(batch, 2, dim)
        return torch.cat([torch.full((batch, 1, dim), float("inf")), undecided], dim=1)

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """[u_1, u_2, u_3] as the paper computes them (GAP and GMP heads), [B, 3, D]; eval mode."""
        x, part = self._maps(images)
        return torch.stack([self.stage1(x)[0], self.stage2(part)[0], self.stage3(part)[0]], dim=1)


@ARCHITECTURE_REGISTRY.register("pmm")
def build_pmm(model_cfg: dict, num_classes: int) -> PMM:
    options = options_of(PMMOptions, model_cfg)
    return PMM(
        backbone=model_cfg["backbone"],
        num_classes=num_classes,
        dim=model_cfg.get("reduction_dim") or 512,
        pretrained=model_cfg.get("pretrained"),
        ibn=model_cfg.get("ibn", False),
        last_stride=model_cfg.get("last_stride", 1),
        classifier_init_std=options.classifier_init_std,
        bn_neck=model_cfg.get("bn_neck", False),
    )
