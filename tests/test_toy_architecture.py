"""A new architecture is new code, not an edit of shared files: this test adds one (its model options, its
builder, its objective with its loss options and its results-table name, a sampler of its own) by registering
them here, then trains, evaluates and exports it through the unchanged trainer and exporter."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from model_zoo.architectures.common import InputNormalization, ReIDOutput
from model_zoo.registry import ARCHITECTURE_REGISTRY, MODEL_OPTIONS_REGISTRY, option
from training.data.samplers import SAMPLER_REGISTRY, RandomBatchSampler
from training.objectives.base import LOSS_OPTIONS_REGISTRY, OBJECTIVE_REGISTRY, Objective
from tests.conftest import tiny_overrides


@MODEL_OPTIONS_REGISTRY.register("toy")
@dataclass
class ToyOptions:
    toy_width: int = option(4, "toy: channels of its one convolution")


class ToyNet(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.normalize = InputNormalization()
        self.conv = nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.classifier = nn.Linear(width, num_classes)

    def parameter_groups(self):
        return {"classifiers": [self.classifier]}

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        maps = torch.relu(self.conv(self.normalize(images)))[:, None]  # one branch: [B, 1, D, h, w]
        logits = self.classifier(maps.mean(dim=(3, 4))) if self.training else None
        return ReIDOutput(feature_maps=maps, logits=logits)


@ARCHITECTURE_REGISTRY.register("toy")
def build_toy(model_cfg: dict, num_classes: int) -> nn.Module:
    return ToyNet(model_cfg["toy_width"], num_classes)


@LOSS_OPTIONS_REGISTRY.register("toy")
@dataclass
class ToyLossOptions:
    toy_weight: float = option(1.0, "toy: weight of its identity loss")


@OBJECTIVE_REGISTRY.register("toy")
class ToyObjective(Objective):
    @staticmethod
    def row_name(model, loss) -> str:
        return f"Toy (width {model['toy_width']})"

    def default_weights(self):
        return {"loss_toy": self.cfg.loss.toy_weight}

    def terms(self, out, targets, active):
        return {"loss_toy": nn.functional.cross_entropy(out.logits[:, 0], targets)}


DRAWN = []


@SAMPLER_REGISTRY.register("toy_sequential")
def toy_sampler(dataset, data_cfg, generator):
    DRAWN.append(len(dataset))
    return RandomBatchSampler(len(dataset), data_cfg.batch_size, generator)


def test_a_toy_architecture_trains_evaluates_exports_and_names_its_row(market_root, tmp_path):
    from bench.training_table import row_name
    from training import export, load_config, train
    from model_zoo.contract import open_cpu_session

    overrides = tiny_overrides(
        market_root,
        tmp_path,
        **{"model.architecture": "toy", "model.toy_width": 6, "loss.toy_weight": 0.5, "data.sampler": "toy_sequential"},
    )
    cfg = load_config("base.yaml", overrides)
    assert cfg.model.toy_width == 6 and cfg.loss.toy_weight == 0.5
    summary = train(cfg)
    assert DRAWN and "prid" not in summary["evaluation"] and summary["evaluation"]
    export(tmp_path / "model.pt", tmp_path / "model.onnx")
    _, contract = open_cpu_session(tmp_path / "model.onnx")
    assert (contract.architecture, contract.branch_dim) == ("toy", 6)
    assert row_name(cfg.to_dict()) == "Toy (width 6)"


def test_an_option_two_owners_declare_is_refused():
    from model_zoo.registry import Registry
    from training.config import SharedModelOptions, compose_section

    registry = Registry("model options")

    @registry.register("clashing")
    @dataclass
    class Clash:
        backbone: str = option("x", "declared again")

    with pytest.raises(TypeError, match="'backbone' declared by SharedModelOptions and Clash"):
        compose_section("ModelConfig", SharedModelOptions, registry)
