"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019) with torchreid's
state-dict keys, so torchreid's checkpoints (``osnet_x1_0`` .. ``osnet_x0_25``, ``osnet_ibn_x1_0``,
``osnet_ain_x1_0`` .. ``osnet_ain_x0_25``) load unchanged.

Each omni-scale block runs four streams of 1 to 4 lightweight 3x3 convolutions (1x1 then depthwise), mixes
them with a shared channel gate, and adds a residual; ``ibn`` puts instance norms in the stem and after the
first stage's residual sums, as torchreid's ``osnet_ibn``. OSNet-AIN ("Learning Generalisable Omni-Scale
Representations", Zhou et al. 2021: the architecture its search found) has an instance norm in the stem and,
in five of its six blocks' fixed pattern, one inside the residual branch instead of a batch norm; its
transitions sit outside the stages (``pool2``, ``pool3``), as its keys say. A 256x128 input gives a 16x8
map (stride 16).

Named stages by resolution, as MobileNetV2's and ResNet-50's: ``stem`` = conv1 + max pool (stride 4),
``layer1`` = conv2 with its transition (stride 8), ``layer2`` = conv3 with its transition (stride 16),
``layer3`` = conv4 (stride 16), ``layer4`` = conv5 (the 1x1 convolution, stride 16). Multi-branch models copy
``conv4`` + ``conv5`` per branch (``last_stage``): conv5 alone is a 1x1 convolution, too little to learn
different regions from. ``fc`` (Linear, BatchNorm1d, ReLU: torchreid's 512-d re-ID head) is built so its keys
load; the backbone's parts do not use it (``model_zoo.importers.torchreid`` does).
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.backbones.base import BackboneParts, load_checkpoint
from model_zoo.backbones.ibn import ibn_variant
from model_zoo.registry import BACKBONE_REGISTRY

WIDTHS = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
}
BLOCKS_PER_STAGE = 2
FEATURE_DIM = 512


class ConvLayer(nn.Module):
    """Convolution, batch norm (an affine instance norm with ``instance_norm``), ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, instance_norm: bool = False
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        self.bn = nn.InstanceNorm2d(out_ch, affine=True) if instance_norm else nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Conv1x1(nn.Module):
    """1x1 convolution and batch norm (none without ``batch_norm``), with a ReLU unless ``linear``."""

    def __init__(self, in_ch: int, out_ch: int, linear: bool = False, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch) if batch_norm else None
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) if self.bn is None else self.bn(self.conv(x))
        return x if self.linear else F.relu(x)


class LightConv3x3(nn.Module):
    """1x1 convolution, then a depthwise 3x3, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False, groups=out_ch)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """Per-channel weights in (0, 1) from the globally pooled input, shared by the four streams."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class OSBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, instance_norm: bool = False, bottleneck_reduction: int = 4):
        super().__init__()
        mid = out_ch // bottleneck_reduction
        self.conv1 = Conv1x1(in_ch, mid)
        self.conv2a = LightConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(4)))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1(mid, out_ch, linear=True)
        self.downsample = Conv1x1(in_ch, out_ch, linear=True) if in_ch != out_ch else None
        self.IN = nn.InstanceNorm2d(out_ch, affine=True) if instance_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        streams = sum(self.gate(stream(x1)) for stream in (self.conv2a, self.conv2b, self.conv2c, self.conv2d))
        out = self.conv3(streams) + (x if self.downsample is None else self.downsample(x))
        return F.relu(out if self.IN is None else self.IN(out))


class LightConvStream(nn.Module):
    """OSNet-AIN's stream: ``depth`` lightweight 3x3 convolutions (its keys: ``layers.i``)."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.layers = nn.Sequential(*(LightConv3x3(channels, channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AINBlock(nn.Module):
    """OSNet-AIN's block; with ``instance_norm`` (its OSBlockINin) the residual branch ends in an affine
    instance norm instead of a batch norm, before the sum."""

    def __init__(self, in_ch: int, out_ch: int, instance_norm: bool, bottleneck_reduction: int = 4):
        super().__init__()
        mid = out_ch // bottleneck_reduction
        self.conv1 = Conv1x1(in_ch, mid)
        self.conv2 = nn.ModuleList(LightConvStream(mid, depth) for depth in range(1, 5))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1(mid, out_ch, linear=True, batch_norm=not instance_norm)
        self.downsample = Conv1x1(in_ch, out_ch, linear=True) if in_ch != out_ch else None
        self.IN = nn.InstanceNorm2d(out_ch, affine=True) if instance_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        branch = self.conv3(sum(self.gate(stream(x1)) for stream in self.conv2))
        branch = branch if self.IN is None else self.IN(branch)
        return F.relu(branch + (x if self.downsample is None else self.downsample(x)))


# OSNet-AIN's blocks, stage by stage: True where the block has the instance norm inside its residual branch.
AIN_PATTERN = ((True, True), (False, True), (True, False))


def _stage(in_ch: int, out_ch: int, transition: bool, instance_norm: bool = False) -> nn.Sequential:
    blocks = [OSBlock(in_ch if i == 0 else out_ch, out_ch, instance_norm) for i in range(BLOCKS_PER_STAGE)]
    if transition:  # torchreid's reduce_spatial_size: a 1x1 conv and 2x2 average pooling
        blocks.append(nn.Sequential(Conv1x1(out_ch, out_ch), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*blocks)


class OSNet(nn.Module):
    """torchreid's OSNet without its classifier: ``conv1`` .. ``conv5`` and the 512-d ``fc`` head."""

    def __init__(self, widths=WIDTHS["osnet_x1_0"], ibn: bool = False):
        super().__init__()
        self.widths = widths
        self.conv1 = ConvLayer(3, widths[0], 7, stride=2, padding=3, instance_norm=ibn)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _stage(widths[0], widths[1], transition=True, instance_norm=ibn)
        self.conv3 = _stage(widths[1], widths[2], transition=True)
        self.conv4 = _stage(widths[2], widths[3], transition=False)
        self.conv5 = Conv1x1(widths[3], widths[3])
        self.fc = nn.Sequential(nn.Linear(widths[3], FEATURE_DIM), nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (conv5's output), [B, C, H / 16, W / 16]."""
        return self.conv5(self.conv4(self.conv3(self.conv2(self.maxpool(self.conv1(x))))))

    def torchreid_output(self, x: torch.Tensor) -> torch.Tensor:
        """torchreid's eval-mode output: the 512-d feature after global average pooling and ``fc``."""
        return self.fc(self(x).mean(dim=(2, 3)))

    def split(self) -> BackboneParts:
        return _split(self, self.conv2, self.conv3)


class OSNetAIN(nn.Module):
    """torchreid's OSNet-AIN without its classifier: ``conv1`` .. ``conv5``, ``pool2``, ``pool3`` and ``fc``."""

    def __init__(self, widths=WIDTHS["osnet_x1_0"]):
        super().__init__()
        self.widths = widths
        self.conv1 = ConvLayer(3, widths[0], 7, stride=2, padding=3, instance_norm=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2, self.conv3, self.conv4 = (
            nn.Sequential(
                *(
                    AINBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], pattern[j])
                    for j in range(BLOCKS_PER_STAGE)
                )
            )
            for i, pattern in enumerate(AIN_PATTERN)
        )
        self.pool2 = nn.Sequential(Conv1x1(widths[1], widths[1]), nn.AvgPool2d(2, stride=2))
        self.pool3 = nn.Sequential(Conv1x1(widths[2], widths[2]), nn.AvgPool2d(2, stride=2))
        self.conv5 = Conv1x1(widths[3], widths[3])
        self.fc = nn.Sequential(nn.Linear(widths[3], FEATURE_DIM), nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.maxpool(self.conv1(x))))
        return self.conv5(self.conv4(self.pool3(self.conv3(x))))

    def torchreid_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self(x).mean(dim=(2, 3)))

    def split(self) -> BackboneParts:
        return _split(self, nn.Sequential(self.conv2, self.pool2), nn.Sequential(self.conv3, self.pool3))


def _split(net: nn.Module, layer1: nn.Module, layer2: nn.Module) -> BackboneParts:
    """Named stages (module docstring) and the multi-branch split: the trunk up to conv3, conv4 + conv5 copied
    per branch. ``layer1``, ``layer2``: the two strided stages with their transitions."""
    stem = nn.Sequential(net.conv1, net.maxpool)
    stages = {"stem": stem, "layer1": layer1, "layer2": layer2, "layer3": net.conv4, "layer4": net.conv5}
    strides = {"stem": 4, "layer1": 8, "layer2": 16, "layer3": 16, "layer4": 16}
    widths = net.widths
    channels = {"stem": widths[0], "layer1": widths[1], "layer2": widths[2], "layer3": widths[3], "layer4": widths[3]}
    return BackboneParts(
        trunk=nn.Sequential(stem, layer1, layer2),
        last_stage=nn.Sequential(net.conv4, net.conv5),
        out_channels=widths[3],
        stride=16,
        stages=stages,
        stage_channels=channels,
        stage_strides=strides,
    )


def build_osnet(name: str, pretrained: Optional[str] = None, ibn: Union[bool, str] = False) -> nn.Module:
    """``osnet_x1_0`` .. ``osnet_x0_25`` (``ibn``: torchreid's osnet_ibn) or ``osnet_ain_x1_0`` ..
    ``osnet_ain_x0_25``."""
    variant = ibn_variant(ibn)
    ain = name.startswith("osnet_ain_")
    if variant not in (None, "a") or (ain and variant):
        why = (
            "OSNet-AIN has its own instance norms, no IBN"
            if ain
            else f"no IBN-{variant}; ibn: true is torchreid osnet_ibn"
        )
        raise ValueError(f"{name}: {why}")
    widths = WIDTHS[name.replace("osnet_ain_", "osnet_")]
    net = OSNetAIN(widths) if ain else OSNet(widths, ibn=variant == "a")
    if pretrained:
        load_checkpoint(net, pretrained)
    return net


def _register(name: str) -> None:
    @BACKBONE_REGISTRY.register(name)
    def build(pretrained: Optional[str] = None, ibn: Union[bool, str] = False, last_stride: int = 1) -> BackboneParts:
        if last_stride != 1:
            raise ValueError("OSNet's last stages keep stride 16 (no last_stride to change); set model.last_stride=1")
        return build_osnet(name, pretrained, ibn).split()


for _name in WIDTHS:
    _register(_name)
    _register(_name.replace("osnet_", "osnet_ain_"))
