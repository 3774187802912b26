"""ResNet-50 with torchvision's state-dict keys and the last spatial down-sampling removed (as in PCB) by
default (``last_stride=2`` gives the standard network).

A 256x128 input gives a 16x8 map. The trunk is conv1..conv4 (``layer3``), the last stage is ``layer4``.
Named stages: ``stem`` (conv1, bn1, relu, maxpool: "pool1", stride 4), ``layer1``..``layer4``.
"""

from typing import Optional, Union

from torch import nn

from model_zoo.backbones.base import BackboneParts, load_checkpoint
from model_zoo.backbones.ibn import ibn_variant, instance_norm, to_instance_batch_norm
from model_zoo.registry import BACKBONE_REGISTRY


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.IN: Optional[nn.Module] = None  # IBN-b: an instance norm between the residual sum and the ReLU

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        return self.relu(out if self.IN is None else self.IN(out))


class ResNet50(nn.Module):
    """torchvision's resnet50 layout (without ``fc``); ``last_stride`` sets layer4's stride."""

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self.last_stride = last_stride
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.in_channels = 64
        self.layer1 = self._layer(64, 3, 1)
        self.layer2 = self._layer(128, 4, 2)
        self.layer3 = self._layer(256, 6, 2)
        self.layer4 = self._layer(512, 3, last_stride)

    def _layer(self, width: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self.in_channels, width, stride, downsample)]
        self.in_channels = out_channels
        layers += [Bottleneck(out_channels, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def use_ibn(self, variant: str = "a") -> None:
        """As in IBN-Net. IBN-a: bn1 of every bottleneck in layer1-3 becomes half instance, half batch norm.
        IBN-b: the stem's bn1 becomes an instance norm (same keys), and the last blocks of layer1 and layer2
        get an affine instance norm before their final ReLU (new keys ``IN.weight``, ``IN.bias``: IBN-Net's own,
        so its released ResNet-50-IBN-b checkpoints load; a torchvision checkpoint leaves them at 1 and 0)."""
        if variant == "a":
            for layer in (self.layer1, self.layer2, self.layer3):
                for block in layer:
                    block.bn1 = to_instance_batch_norm(block.bn1)
            return
        self.bn1 = to_instance_batch_norm(self.bn1, instance_ratio=1.0)
        for layer in (self.layer1, self.layer2):
            layer[-1].IN = instance_norm(layer[-1].bn3.num_features, affine=True)

    def split(self) -> BackboneParts:
        trunk = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3)
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        stages = {
            "stem": stem,
            "layer1": self.layer1,
            "layer2": self.layer2,
            "layer3": self.layer3,
            "layer4": self.layer4,
        }
        strides = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 * self.last_stride}
        channels = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        return BackboneParts(
            trunk=trunk,
            last_stage=self.layer4,
            out_channels=2048,
            stride=strides["layer4"],
            stages=stages,
            stage_channels=channels,
            stage_strides=strides,
        )


@BACKBONE_REGISTRY.register("resnet50")
def build_resnet50(
    pretrained: Optional[str] = None, ibn: Union[bool, str] = False, last_stride: int = 1
) -> BackboneParts:
    net = ResNet50(last_stride)
    variant = ibn_variant(ibn)
    if variant:
        net.use_ibn(variant)
    if pretrained:
        load_checkpoint(net, pretrained)
    return net.split()
