"""CLPD (CSPR-Net): Concentrated Local Part Discovery with fine-grained part representation (Wan et al., IEEE
TMM 2020; design: shared/design/paper-family.md, section 4).

- Backbone: stem..layer3 (the middle tap), then layer4 (``last_stride``; 1 puts both on one grid).
- Global branch: GAP(layer4) -> FC (bias) -> BN1d = u_g (D-dim), classifier with bias (eq. 15).
- Local branch: X = ReLU(BN(conv1x1(layer3))), the "single convolutional layer" on the middle stage; N
  attention modules M^i = sigmoid(BN(R_1x1(K(X)))) (eq. 1-3, ``MultiscaleAttention``); Z^i = M^i X (eq. 4);
  SPR^i = FC_i([F_S; F_P; F_R]) (eq. 12-14, ``PartDescriptor``), D/N-dim, bias, no activation; u_l = BN1d of
  their concatenation, with one classifier (bias). The concentration losses on M^i are in the objective
  (``training/objectives/clpd.py``), which runs ``global_output`` alone while no local term is on (step 1).

Sizes: D = ``reduction_dim`` (512: the paper's 1,024-d = 512 global + 8 x 64 local); X has
``clpd_middle_channels`` (256) channels. The 1x1 conv is the design's option (4.6.1): the literal reading of
"after a single convolutional layer", a four-fold cut of the descriptor's 14C inputs at ResNet-50's C = 1024,
and X >= 0 on MobileNetV2 too, whose layer3 output is a linear bottleneck (a signed X would make the
barycentre's denominator vanish). Feature maps: 2 x 512 on layer3's grid (16 x 8 at 256 x 128, 8 x 4 at
128 x 64), the size of PMM's.

Contract: N = 2 branches whose grid means are exactly u_g and u_l. F^g = BN(FC(layer4)) per cell (R1; R8 when
layer4 is coarser). F^l = BN(concat_i F^(i)) (R1, R9), F^(i) = b_i + sum over the descriptor's blocks of
W_{i,k} phi_k(x, y), one per-cell decomposition per block: max, min, median by selection (R4), the mean as Z
itself, the variance by R5, the barycentre by R3, each cosine distance by R6. Built block by block, so no
14C x h x w tensor exists. The maps are attributions (``feature_maps_kind``). In eval mode ``aux`` carries
the part attention maps M [B, N, h, w], which the exporter writes as the optional ``attention_maps`` output.
"""

import re
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput
from model_zoo.architectures.contract_maps import (
    affine_map,
    as_affine,
    cosine_distance_map,
    selected_values,
    selection_map,
    selection_margin,
    upsample_nearest,
    variance_map,
    weighted_map,
)
from model_zoo.registry import ARCHITECTURE_REGISTRY, BACKBONE_REGISTRY, MODEL_OPTIONS_REGISTRY, option, options_of

STATISTICS = ("max", "min", "mean", "median", "var")
SELECTIONS = ("max", "min", "median")
DESCRIPTORS = re.compile(r"^[GS]P?R?$")
BARYCENTRE_EPS = 1e-6  # in the barycentre's denominator: an all-zero channel of Z gives 0, not NaN
COSINE_EPS = 1e-12  # contract_maps.cosine_distance_map's guard: an all-zero channel is at distance 1


@MODEL_OPTIONS_REGISTRY.register("clpd")
@dataclass
class CLPDOptions:
    """The ``model.*`` keys only clpd reads."""

    clpd_parts: int = option(
        8,
        "CLPD: N, the number of part attention modules; the local feature is N part "
        "descriptors of reduction_dim / N each",
    )
    clpd_attention: str = option(
        "multiscale",
        "CLPD: 'multiscale' (the constrained attention module, eq. 1-2) or "
        "'single' (Table VI's AM: sigmoid(BN(conv1x1(X))))",
    )
    clpd_descriptor: str = option(
        "SPR",
        "CLPD: the part descriptor's blocks (Table VI): G (average pooling) or S "
        "(max, min, mean, median, variance), then optionally P (barycentre) and R "
        "(cosine distances to the other parts): G, S, GP, GR, SP, SR or SPR",
    )
    clpd_middle_channels: int = option(
        256,
        "CLPD: channels of X, the single 1x1 conv -> BN -> ReLU on layer3 that the "
        "attention modules and the part descriptor read",
    )


class MultiscaleAttention(nn.Module):
    """N constrained attention modules on X [B, C, h, w] -> M [B, N, h, w] in (0, 1) (eq. 1-3). Module i sees
    K_i(X) = [channel max, channel mean, conv1x1_i, conv3x3_i, conv5x5_i] (convolutions C -> 1 with bias and
    'same' padding) and reduces it with its own 1x1 conv 5 -> 1 and BN. The N modules run as N-channel
    convolutions and a grouped reduction: the same arithmetic, each module with its own parameters."""

    def __init__(self, channels: int, parts: int):
        super().__init__()
        self.kernels = nn.ModuleList(nn.Conv2d(channels, parts, k, padding=k // 2) for k in (1, 3, 5))
        self.reduce = nn.Conv2d(5 * parts, parts, 1, groups=parts)
        self.bn = nn.BatchNorm2d(parts)

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """K_i(X) for every module, [B, N, 5, h, w]."""
        batch, _, height, width = x.shape
        pooled = torch.stack([x.amax(dim=1), x.mean(dim=1)], dim=1)[:, None]
        convolved = torch.stack([conv(x) for conv in self.kernels], dim=2)
        return torch.cat([pooled.expand(batch, convolved.shape[1], 2, height, width), convolved], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.reduce(self.scales(x).flatten(1, 2))))


class SingleScaleAttention(nn.Module):
    """Table VI's "AM": M^i = sigmoid(BN(conv1x1_i(X))), C -> 1 per module, [B, C, h, w] -> [B, N, h, w]."""

    def __init__(self, channels: int, parts: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, parts, 1)
        self.bn = nn.BatchNorm2d(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x)))


ATTENTIONS = {"multiscale": MultiscaleAttention, "single": SingleScaleAttention}


def statistic(z: torch.Tensor, name: str) -> torch.Tensor:
    """F_S's entries (eq. 12) computed directly, [..., C, h, w] -> [..., C]: population variance, lower median."""
    flat = z.flatten(-2)
    if name == "median":
        return flat.median(dim=-1).values
    if name == "var":
        return flat.var(dim=-1, unbiased=False)
    return {"max": flat.amax, "min": flat.amin, "mean": flat.mean}[name](dim=-1)


def statistic_map(z: torch.Tensor, name: str) -> torch.Tensor:
    """The per-cell decomposition of ``statistic(z, name)``: R4 for selections, R5 for the variance."""
    if name in SELECTIONS:
        return selection_map(z, name)
    return variance_map(z) if name == "var" else z


def coordinates(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y^ [h, 1], x^ [1, w]): cell coordinates scaled to [0, 1] (y / (h - 1), x / (w - 1))."""
    height, width = z.shape[-2:]
    return (
        torch.linspace(0, 1, height, dtype=z.dtype, device=z.device)[:, None],
        torch.linspace(0, 1, width, dtype=z.dtype, device=z.device)[None, :],
    )


def barycentre(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """F_P (eq. 13), normalised: per channel (sum Z y^ / sum Z, sum Z x^ / sum Z), two [..., C]; Z >= 0."""
    total = z.sum(dim=(-2, -1)) + BARYCENTRE_EPS
    return tuple((z * coordinate).sum(dim=(-2, -1)) / total for coordinate in coordinates(z))


def relational(z: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """F_R (eq. 14) of every part, [B, N, C, h, w] -> [B, N, N-1, C]: per channel the cosine distance
    D(Z^i, Z^j) = 1 - cos of the flattened maps, for the parts j = ``others[i]`` (every part but i, in order).
    One Gram product per channel gives all pairs."""
    flat = z.flatten(-2)
    norms = flat.norm(dim=-1)
    cosines = torch.einsum("bncx,bmcx->bnmc", flat, flat) / (norms[:, :, None] * norms[:, None]).clamp(min=COSINE_EPS)
    return 1 - cosines[:, torch.arange(len(others), device=z.device)[:, None], others]


class PartDescriptor(nn.Module):
    """SPR^i = FC_i([F_S; F_P; F_R]) for every part i: attention features Z [B, N, C, h, w] -> [B, N, P].

    ``descriptor`` names the blocks (Table VI): ``G`` (the mean alone, i.e. GAP) or ``S`` (max, min, mean,
    median, variance), then ``P`` (the barycentre, y then x) and ``R`` (the cosine distance to every other part,
    in part order). FC_i's weight is [P, blocks, C]: block k's C inputs are one statistic of Z^i's C channels."""

    def __init__(self, channels: int, parts: int, dim: int, descriptor: str = "SPR"):
        super().__init__()
        if not DESCRIPTORS.match(descriptor):
            raise ValueError(
                f"clpd_descriptor {descriptor!r}: G or S, then optionally P and R (G, S, GP, GR, SP, SR, SPR)"
            )
        self.statistics = STATISTICS if descriptor[0] == "S" else ("mean",)
        self.positional, self.relational = "P" in descriptor, "R" in descriptor
        blocks = len(self.statistics) + 2 * self.positional + (parts - 1) * self.relational
        bound = (blocks * channels) ** -0.5  # nn.Linear's initialisation, fan-in = the descriptor's length
        self.weight = nn.Parameter(torch.empty(parts, dim, blocks, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(parts, dim).uniform_(-bound, bound))
        others = [[j for j in range(parts) if j != i] for i in range(parts)]
        self.register_buffer("others", torch.tensor(others, dtype=torch.long).view(parts, parts - 1), persistent=False)

    def vectors(self, z: torch.Tensor) -> torch.Tensor:
        """[F_S; F_P; F_R] computed directly (the paper's), [B, N, blocks, C]."""
        blocks = [statistic(z, name) for name in self.statistics]
        blocks += list(barycentre(z)) if self.positional else []
        blocks += list(relational(z, self.others).unbind(dim=2)) if self.relational else []
        return torch.stack(blocks, dim=2)

    def cell_maps(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The per-cell decompositions of ``vectors``' blocks, in its order, each [B, N, C, h, w]."""
        for name in self.statistics:
            yield statistic_map(z, name)
        if self.positional:
            for coordinate in coordinates(z):
                yield weighted_map(coordinate.expand_as(z), z, BARYCENTRE_EPS)
        for m in range(self.others.shape[1] if self.relational else 0):
            yield cosine_distance_map(z, z[:, self.others[:, m]], COSINE_EPS)  # D(Z^i, Z^j) for j = the m-th other part

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("npkc,bnkc->bnp", self.weight, self.vectors(z)) + self.bias

    def contract_map(self, z: torch.Tensor) -> torch.Tensor:
        """[B, N, P, h, w] whose grid mean is ``forward(z)``: R1 on each block's map, one block at a time."""
        out = self.bias[:, :, None, None]
        for k, block in enumerate(self.cell_maps(z)):
            out = out + torch.einsum("npc,bnchw->bnphw", self.weight[:, :, k], block)
        return out

    def selection_margins(self, z: torch.Tensor) -> torch.Tensor:
        """[B, N]: the least decided selection (max, min, median) over part i's channels, which FC_i mixes into
        all its outputs; a selected value of exactly 0 (ReLU zeros) adds 0 wherever it lands and is decided."""
        margins = [
            selection_margin(z, mode).masked_fill(selected_values(z, mode) == 0, float("inf"))
            for mode in SELECTIONS
            if mode in self.statistics
        ]
        if not margins:
            return torch.full(z.shape[:2], float("inf"), device=z.device)
        return torch.cat(margins, dim=-1).amin(dim=-1)


class CLPD(nn.Module):
    """CSPR-Net: a global and a local branch (module docstring); the contract's two branches in eval mode."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        dim: int = 512,
        parts: int = 8,
        middle_channels: int = 256,
        attention: str = "multiscale",
        descriptor: str = "SPR",
        pretrained=None,
        ibn: bool = False,
        last_stride: int = 1,
    ):
        super().__init__()
        if dim % parts:
            raise ValueError(f"reduction_dim {dim} must split into clpd_parts={parts} equal part descriptors")
        if attention not in ATTENTIONS:
            raise ValueError(f"clpd_attention {attention!r}: one of {', '.join(ATTENTIONS)}")
        net = BACKBONE_REGISTRY.get(backbone)(pretrained, ibn=ibn, last_stride=last_stride)
        self.normalize = InputNormalization()
        self.to_middle, self.last = net.stage_range("stem", "layer3"), net.stages["layer4"]
        self.upsample = net.stage_strides["layer4"] // net.stage_strides["layer3"]
        self.global_fc = nn.Linear(net.out_channels, dim)
        self.global_bn = nn.BatchNorm1d(dim)
        self.global_classifier = nn.Linear(dim, num_classes)
        self.middle = nn.Sequential(
            nn.Conv2d(net.stage_channels["layer3"], middle_channels, 1, bias=False),
            nn.BatchNorm2d(middle_channels),
            nn.ReLU(inplace=True),
        )
        self.attention = ATTENTIONS[attention](middle_channels, parts)
        self.descriptor = PartDescriptor(middle_channels, parts, dim // parts, descriptor)
        self.local_bn = nn.BatchNorm1d(dim)
        self.local_classifier = nn.Linear(dim, num_classes)
        self.num_parts = parts
        self.feature_maps_kind = "activations" if descriptor == "G" else "attribution"

    def parameter_groups(self) -> Dict[str, list]:
        """``backbone`` (ImageNet), ``global`` (its FC, BN, classifier), ``local`` (the middle conv, attention
        modules, SPR FCs, BN, classifier): the two steps' groups; ``classifiers`` for a warm-up."""
        return {
            "backbone": [self.to_middle, self.last],
            "global": [self.global_fc, self.global_bn, self.global_classifier],
            "local": [self.middle, self.attention, self.descriptor, self.local_bn, self.local_classifier],
            "classifiers": [self.global_classifier, self.local_classifier],
        }

    def _stages(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(layer3's output, layer4's output)."""
        middle = self.to_middle(self.normalize(images))
        return middle, self.last(middle)

    def part_features(self, middle: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(attention maps M [B, N, h, w], attention features Z [B, N, C, h, w]) from layer3's output."""
        x = self.middle(middle)
        maps = self.attention(x)
        return maps, maps[:, :, None] * x[:, None]

    def global_vector(self, last: torch.Tensor) -> torch.Tensor:
        return self.global_bn(self.global_fc(last.mean(dim=(2, 3))))

    def local_vector(self, z: torch.Tensor) -> torch.Tensor:
        """u_l; the descriptor runs in fp32 (autocast off): a cosine over h x w products can overflow fp16."""
        with torch.autocast(z.device.type, enabled=False):
            return self.local_bn(self.descriptor(z.float()).flatten(1))

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        """Eval: the contract maps, and M in ``aux["attention_maps"]``. Training: logits [B, 2, C] (global, local),
        u_g and u_l as 1x1 ``feature_maps``, M in ``aux["attention_maps"]`` for the concentration losses."""
        middle, last = self._stages(images)
        maps, z = self.part_features(middle)
        if not self.training:
            return ReIDOutput(
                feature_maps=torch.stack([self.global_map(last), self.local_map(z)], dim=1),
                aux={"attention_maps": maps},
            )
        u_g, u_l = self.global_vector(last), self.local_vector(z)
        logits = torch.stack([self.global_classifier(u_g), self.local_classifier(u_l)], dim=1)
        return ReIDOutput(
            feature_maps=torch.stack([u_g, u_l], dim=1)[..., None, None], logits=logits, aux={"attention_maps": maps}
        )

    def global_output(self, images: torch.Tensor) -> ReIDOutput:
        """The global branch alone (step 1 trains nothing else): u_g as a 1x1 map [B, 1, D, 1, 1], logits [B, 1, C]."""
        u_g = self.global_vector(self._stages(images)[1])
        return ReIDOutput(feature_maps=u_g[:, None, :, None, None], logits=self.global_classifier(u_g)[:, None])

    def global_map(self, last: torch.Tensor) -> torch.Tensor:
        """F^g: the FC and the eval-mode BN per cell (R1), on the middle grid (R8)."""
        maps = affine_map(affine_map(last, *as_affine(self.global_fc)), *as_affine(self.global_bn))
        return upsample_nearest(maps, self.upsample) if self.upsample > 1 else maps

    def local_map(self, z: torch.Tensor) -> torch.Tensor:
        """F^l: the parts' SPR maps concatenated (R9), the eval-mode BN folded in (R1)."""
        return affine_map(self.descriptor.contract_map(z.float()).flatten(1, 2), *as_affine(self.local_bn))

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """[u_g, u_l] as the paper computes them (GAP + FC + BN; SPR + FC + BN), [B, 2, D]; eval mode."""
        middle, last = self._stages(images)
        return torch.stack([self.global_vector(last), self.local_vector(self.part_features(middle)[1])], dim=1)

    def selection_margins(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 2, D] for the exporter's parity rule: the global branch selects nothing (inf); each local channel
        takes its part's least decided selection."""
        z = self.part_features(self._stages(images)[0])[1]
        local = self.descriptor.selection_margins(z).repeat_interleave(
            self.local_bn.num_features // self.num_parts, dim=1
        )
        return torch.stack([torch.full_like(local, float("inf")), local], dim=1)


@ARCHITECTURE_REGISTRY.register("clpd")
def build_clpd(model_cfg: dict, num_classes: int) -> CLPD:
    options = options_of(CLPDOptions, model_cfg)
    return CLPD(
        backbone=model_cfg["backbone"],
        num_classes=num_classes,
        dim=model_cfg.get("reduction_dim") or 512,
        parts=options.clpd_parts,
        middle_channels=options.clpd_middle_channels,
        attention=options.clpd_attention,
        descriptor=options.clpd_descriptor,
        pretrained=model_cfg.get("pretrained"),
        ibn=model_cfg.get("ibn", False),
        last_stride=model_cfg.get("last_stride", 1),
    )
