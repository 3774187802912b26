"""torchreid OSNet checkpoints (every width; IBN; AIN) as contract models: the network rebuilt from
``model_zoo.backbones.osnet`` (whose keys are torchreid's), its 512-d ``fc`` head (Linear, BatchNorm1d, ReLU)
decomposed per cell (``exact_head``).
torchreid feeds RGB normalised with ImageNet's mean and std, at 256x128 by default."""

from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.architectures.common import InputNormalization
from model_zoo.backbones.base import read_state_dict
from model_zoo.backbones.osnet import WIDTHS, build_osnet
from model_zoo.importers.exact_head import ExactHeadModel, HeadStep


def detect(state: Dict[str, torch.Tensor]) -> Tuple[str, bool]:
    """(backbone name, IBN) of a torchreid OSNet state dict: the width from its stem's channels, AIN from its
    separate transitions (``pool2``), IBN from a stem norm without running statistics (an instance norm)."""
    if "conv1.conv.weight" not in state or "fc.0.weight" not in state:
        raise ValueError("not a torchreid OSNet state dict (no conv1.conv.weight / fc.0.weight)")
    stem = state["conv1.conv.weight"].shape[0]
    names = [name for name, widths in WIDTHS.items() if widths[0] == stem]
    if not names:
        raise ValueError(f"an OSNet stem of {stem} channels matches no width ({', '.join(WIDTHS)})")
    if "pool2.0.conv.weight" in state:
        return names[0].replace("osnet_", "osnet_ain_"), False
    return names[0], "conv1.bn.running_mean" not in state


def _linear_of_batch_norm(norm: nn.BatchNorm1d):
    return lambda y: y * (norm.weight / torch.sqrt(norm.running_var + norm.eps))


def contract_model(checkpoint: Path) -> Tuple[ExactHeadModel, str]:
    """The checkpoint as a contract model, eval mode, and its architecture's name (e.g. ``osnet_ibn_x1_0``)."""
    name, ibn = detect(read_state_dict(checkpoint))
    net = build_osnet(name, str(checkpoint), ibn).eval()
    linear, norm, _ = net.fc
    steps = [
        HeadStep(linear, lambda y: F.linear(y, linear.weight)),
        HeadStep(norm, _linear_of_batch_norm(norm)),
        HeadStep(F.relu, None, lambda x: (x > 0).to(x.dtype)),
    ]
    model = ExactHeadModel(
        InputNormalization(),
        net,
        lambda maps: maps / (maps.shape[2] * maps.shape[3]),
        (-1, net.widths[3]),
        steps,
        net.torchreid_output,
    )
    return model.eval(), name.replace("osnet_", "osnet_ibn_") if ibn else name
