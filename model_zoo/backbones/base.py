"""What a backbone hands to an architecture, and how checkpoints are loaded into it."""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class BackboneParts:
    """A backbone split for multi-branch models: ``trunk`` is shared, ``last_stage`` is copied per branch."""

    trunk: nn.Module
    last_stage: nn.Module
    out_channels: int
    stride: int  # input pixels per feature-map cell


class CheckpointMismatch(ValueError):
    """A checkpoint tensor has a different shape from the model's."""


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a state dict from a .pt/.pth file, unwrapping the usual ``state_dict``/``model`` containers."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(
    module: nn.Module,
    path: Path,
    convert: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
) -> Dict[str, list]:
    """Load ``path`` into ``module``; report missing and unexpected keys; refuse any shape mismatch."""
    state = read_state_dict(path)
    if convert is not None:
        state = convert(state)
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointMismatch(f"{path}: shape mismatch for " + "; ".join(mismatched))
    result = module.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if report["missing"]:
        log.warning("checkpoint %s: %d missing keys: %s", path, len(report["missing"]), report["missing"][:10])
    if report["unexpected"]:
        log.info("checkpoint %s: %d unexpected keys ignored: %s", path, len(report["unexpected"]), report["unexpected"][:10])
    return report
