"""A trained model from its checkpoint, and what an architecture's builder reads from a training config: shared
by the trainer, the evaluation, the export and the adaptation. An OpenVINO IR (``.xml`` beside its ``.bin``)
stands for a checkpoint too: its rebuild as ``omz_finetune.yaml``'s ``openvino_ir`` architecture, so the
shipped default's source can be adapted, evaluated and exported like a run's model."""

from dataclasses import asdict
from pathlib import Path
from typing import Tuple

import torch

from model_zoo.architectures import build_model
from training.config import CONFIG_DIR, TrainConfig, from_dict, load_config

IR_CONFIG = CONFIG_DIR / "omz_finetune.yaml"  # an IR's settings as a checkpoint: the fine-tune's input and augmentation


def model_settings(cfg: TrainConfig) -> dict:
    """What an architecture's builder reads: the model section plus the input size (FMN's mask is a fixed grid)."""
    return {**asdict(cfg.model), "input_size": (cfg.data.height, cfg.data.width)}


def ir_model(ir: Path) -> Tuple[torch.nn.Module, TrainConfig]:
    """An OpenVINO IR's rebuilt network with a one-class classifier (adaptation and export read none) and its
    config: ``IR_CONFIG`` at the IR's input size."""
    from model_zoo.importers.openvino_ir import input_size, read_ir

    height, width = input_size(read_ir(ir))
    overrides = [f"model.source={Path(ir).resolve()}", f"data.height={height}", f"data.width={width}"]
    cfg = load_config(IR_CONFIG, overrides)
    return build_model({**model_settings(cfg), "pretrained": None}, 1), cfg


def ir_checkpoint_state(ir: Path) -> dict:
    """An OpenVINO IR as a training checkpoint's state: its config, its network's weights, one class."""
    model, cfg = ir_model(ir)
    return {"config": cfg.to_dict(), "num_classes": 1, "model": model.state_dict()}


def checkpoint_state(checkpoint: Path, device: str = "cpu") -> dict:
    """A training checkpoint's saved state, or an IR's as ``ir_checkpoint_state`` makes it."""
    if Path(checkpoint).suffix == ".xml":
        return ir_checkpoint_state(checkpoint)
    return torch.load(checkpoint, map_location=device, weights_only=False)


def load_trained_model(checkpoint: Path, device: str = "cpu") -> Tuple[torch.nn.Module, TrainConfig]:
    """The model of a training checkpoint (or an OpenVINO IR), in eval mode, and its config."""
    if Path(checkpoint).suffix == ".xml":  # built once: through checkpoint_state it would be built twice
        model, cfg = ir_model(checkpoint)
        return model.to(device).eval(), cfg
    state = checkpoint_state(checkpoint, device)
    cfg = from_dict(TrainConfig, state["config"])
    model_cfg = {**model_settings(cfg), "pretrained": None}
    model = build_model(model_cfg, state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
