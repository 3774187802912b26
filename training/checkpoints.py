"""A trained model from its checkpoint, and what an architecture's builder reads from a training config: shared
by the trainer, the evaluation and the export (the evaluation no longer reaches into the trainer for them)."""

from dataclasses import asdict
from pathlib import Path
from typing import Tuple

import torch

from model_zoo.architectures import build_model
from training.config import TrainConfig, from_dict


def model_settings(cfg: TrainConfig) -> dict:
    """What an architecture's builder reads: the model section plus the input size (FMN's mask is a fixed grid)."""
    return {**asdict(cfg.model), "input_size": (cfg.data.height, cfg.data.width)}


def load_trained_model(checkpoint: Path, device: str = "cpu") -> Tuple[torch.nn.Module, TrainConfig]:
    """The model of a training checkpoint, in eval mode, and its config."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg = from_dict(TrainConfig, state["config"])
    model_cfg = {**model_settings(cfg), "pretrained": None}
    model = build_model(model_cfg, state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
