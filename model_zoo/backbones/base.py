"""What a backbone hands to an architecture, and how checkpoints are loaded into it."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")


@dataclass
class BackboneParts:
    """A backbone as named stages (``STAGE_NAMES``), plus the usual split for multi-branch models: ``trunk``
    (stem..layer3, shared) and ``last_stage`` (layer4, copied per branch, e.g. by CAMA).

    ``stages`` are views of the same modules as ``trunk`` and ``last_stage``, so an architecture can read a
    middle stage (a tap), run a range of stages, or deep-copy one; ``stage_channels`` and ``stage_strides``
    (input pixels per cell, cumulative) say what each stage's output is.
    """

    trunk: nn.Module
    last_stage: nn.Module
    out_channels: int
    stride: int  # input pixels per feature-map cell
    stages: Dict[str, nn.Module]
    stage_channels: Dict[str, int]
    stage_strides: Dict[str, int]

    def stage_range(self, first: str, last: str) -> nn.Sequential:
        """Stages ``first``..``last`` inclusive, in order, as one module (the same modules, not copies)."""
        names = list(self.stages)
        chosen = names[names.index(first) : names.index(last) + 1]
        if not chosen:
            raise ValueError(f"stage {first!r} comes after {last!r}; order: {', '.join(names)}")
        return nn.Sequential(*(self.stages[name] for name in chosen))


def run_stages(stages: Dict[str, nn.Module], x: torch.Tensor, taps: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Run ``stages`` in order up to the last name in ``taps``; returns the output of each tapped stage."""
    wanted, out = set(taps), {}
    for name, stage in stages.items():
        if not wanted - set(out):
            break
        x = stage(x)
        if name in wanted:
            out[name] = x
    missing = wanted - set(out)
    if missing:
        raise KeyError(f"no stage named {sorted(missing)}; stages: {', '.join(stages)}")
    return out


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
        log.info(
            "checkpoint %s: %d unexpected keys ignored: %s", path, len(report["unexpected"]), report["unexpected"][:10]
        )
    return report
