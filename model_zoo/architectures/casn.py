"""CASN, the Consistent Attentive Siamese Network (Zheng, Karanam, Wu, Radke, CVPR 2019; design:
shared/design/paper-family.md, section 3).

One feature extractor E (the backbone) with an identification head, on one of two layouts:
- ``ide``: f = GAP(A), A the last stage's map; classifier Linear(D -> 512) -> BN -> ReLU -> Dropout(0.5) ->
  Linear(512 -> C). Contract: N = 1, F = A (activations), whose GAP is f exactly.
- ``pcb``: six horizontal stripes of A (adaptive-pooling bins), per stripe h_p = ReLU(BN(conv1x1(g_p))) with
  g_p the stripe's mean, and a classifier per stripe. Contract: N = 6 branches of ``reduction_dim`` channels
  (256 by default, PCB's own h_p), F^p = the ReLU gate of BN(conv(A)) on stripe p scaled by hw / |p| (rules
  R2 + R1 + R7 of ``contract_maps``), whose mean is h_p exactly. The 256-d reduction is what keeps the maps
  affordable for the service: 6 x 2048 raw stripe maps would be 9 MB per image (design 3.3, option b).
  These maps are exact attributions (the gate), hence ``feature_maps_kind = "attribution"``.

The Siamese module is a pair head on f^- = f_a - f_b (f = GAP(A), or the six g_p concatenated for ``pcb``):
Linear -> BN -> ReLU -> Dropout(0.5) -> Linear(-> 2), class 1 = same person. It trains the network
(``training/objectives/casn.py``: identification attention, pair cross-entropy, attention consistency) and is
not part of the exported retrieval graph, because a pairwise term cannot live in a FAISS index: the exporter
writes it beside the file as the test-time re-ranking artifact (``model_zoo/pair_attention.py``). Its input is
A, which ``ide`` exports as its contract map and ``pcb`` as the optional ``pair_maps`` output.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput
from model_zoo.architectures.contract_maps import as_affine, region_map, relu_gate, stripe_masks
from model_zoo.contract import OUTPUT_PAIR_MAPS
from model_zoo.pair_attention import PairHead
from model_zoo.registry import ARCHITECTURE_REGISTRY, BACKBONE_REGISTRY, MODEL_OPTIONS_REGISTRY, option, options_of

LAYOUTS = ("ide", "pcb")
STRIPES = 6


@MODEL_OPTIONS_REGISTRY.register("casn")
@dataclass
class CASNOptions:
    """The ``model.*`` keys only casn reads."""

    layout: str = option(
        "ide",
        "CASN: 'ide' (GAP of the last stage) or 'pcb' (six horizontal stripes, each reduced to "
        "reduction_dim, 256 by default)",
    )


def two_layer_head(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """The paper's "two fully-connected layers": Linear -> BN -> ReLU -> Dropout(0.5) -> Linear."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, out_features),
    )


class StripeHead(nn.Module):
    """PCB's per-stripe reduction (1x1 conv -> BN -> ReLU) and classifier."""

    def __init__(self, channels: int, dim: int, num_classes: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(channels, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, stripe_mean: torch.Tensor):
        """g_p [B, D] -> (h_p [B, dim], logits [B, C])."""
        h = torch.relu(self.reduction(stripe_mean[..., None, None])).flatten(1)
        return h, self.classifier(h)


class CASN(nn.Module):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        layout: str = "ide",
        dim: int = 256,
        hidden: int = 512,
        pretrained: Optional[str] = None,
        ibn: bool = False,
        last_stride: int = 1,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown CASN layout {layout!r}; one of {', '.join(LAYOUTS)}")
        parts = BACKBONE_REGISTRY.get(backbone)(pretrained, ibn=ibn, last_stride=last_stride)
        channels = parts.out_channels
        self.layout = layout
        self.feature_maps_kind = "activations" if layout == "ide" else "attribution"
        self.normalize = InputNormalization()
        self.trunk, self.last_stage = parts.trunk, parts.last_stage
        if layout == "ide":
            self.identity_head = two_layer_head(channels, hidden, num_classes)
        else:
            self.stripes = nn.ModuleList(StripeHead(channels, dim, num_classes) for _ in range(STRIPES))
        self.pair_head = two_layer_head(channels * (1 if layout == "ide" else STRIPES), hidden, 2)
        self.stride = parts.stride

    def parameter_groups(self):
        heads = [self.identity_head] if self.layout == "ide" else list(self.stripes)
        return {"backbone": [self.trunk, self.last_stage], "classifiers": heads, "pair_head": [self.pair_head]}

    def backbone_map(self, normalized: torch.Tensor) -> torch.Tensor:
        """A, the last stage's map, from normalised images [B, 3, H, W]."""
        return self.last_stage(self.trunk(normalized))

    @staticmethod
    def _stripe_means(maps: torch.Tensor) -> torch.Tensor:
        """g_p, the mean of each stripe (adaptive-pooling bins): [B, D, 6]."""
        return F.adaptive_avg_pool2d(maps.float(), (STRIPES, 1)).squeeze(-1)

    def siamese_features(self, maps: torch.Tensor) -> torch.Tensor:
        """f for the pair head: GAP(A) [B, D], or the six stripe means concatenated [B, 6 D]."""
        if self.layout == "ide":
            return maps.float().mean(dim=(2, 3))
        return self._stripe_means(maps).transpose(1, 2).flatten(1)  # [g_1; ...; g_6]

    def heads(self, maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the per-branch test descriptors [B, N, D]: f (ide) or h_p (pcb); the identity logits [B, N, C]), in
        one pass: each head (and its batch norm's running statistics) sees the batch once."""
        if self.layout == "ide":
            features = maps.float().mean(dim=(2, 3))
            return features.unsqueeze(1), self.identity_head(features).unsqueeze(1)
        means = self._stripe_means(maps)
        outputs = [head(means[:, :, p]) for p, head in enumerate(self.stripes)]
        return torch.stack([h for h, _ in outputs], dim=1), torch.stack([logits for _, logits in outputs], dim=1)

    def contract_maps(self, maps: torch.Tensor) -> torch.Tensor:
        if self.layout == "ide":
            return maps.unsqueeze(1)
        masks = stripe_masks(maps.shape[2], maps.shape[3], STRIPES).to(maps.device)
        return torch.stack(
            [relu_gate(region_map(head.reduction(maps), masks[p])) for p, head in enumerate(self.stripes)], dim=1
        )

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        """Eval: the contract maps. Training: identity logits, the descriptors as 1x1 maps, and in ``aux`` the
        normalised images, A and f, which the objective's attention terms need."""
        normalized = self.normalize(images)
        maps = self.backbone_map(normalized)
        if not self.training:
            return ReIDOutput(
                feature_maps=self.contract_maps(maps),
                aux={} if self.layout == "ide" else {OUTPUT_PAIR_MAPS: maps.float()},
            )
        descriptors, logits = self.heads(maps)
        return ReIDOutput(
            feature_maps=descriptors[..., None, None],
            logits=logits,
            aux={"images": normalized, "maps": maps, "siamese": self.siamese_features(maps)},
        )

    @torch.no_grad()
    def pair_head_artifact(self, model_sha256: str, row_threshold: float) -> PairHead:
        """The pair head in eval mode, its batch norm folded into the first layer, for the test-time attention
        term (model_zoo.pair_attention)."""
        first, norm, _, _, second = self.pair_head.eval()
        scale, shift = as_affine(norm)
        weight, bias = scale[:, None] * first.weight, scale * first.bias + shift
        return PairHead(
            weight.numpy(),
            bias.numpy(),
            second.weight[1].numpy(),
            row_threshold,
            model_sha256,
            stripes=1 if self.layout == "ide" else STRIPES,
        )

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone_map(self.normalize(images)))[0]


@ARCHITECTURE_REGISTRY.register("casn")
def build_casn(model_cfg: dict, num_classes: int) -> CASN:
    options = options_of(CASNOptions, model_cfg)
    return CASN(
        backbone=model_cfg["backbone"],
        num_classes=num_classes,
        layout=options.layout,
        dim=model_cfg.get("reduction_dim") or 256,
        pretrained=model_cfg.get("pretrained"),
        ibn=model_cfg.get("ibn", False),
        last_stride=model_cfg.get("last_stride", 1),
    )
