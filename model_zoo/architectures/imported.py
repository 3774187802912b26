"""An imported public model as a trainable architecture: ``openvino_ir`` is an OpenVINO IR rebuilt as torch
modules (``model_zoo.importers``), one branch whose maps are the exact per-cell decomposition of its own
embedding, plus an identity classifier for fine-tuning on re-ID data. Exported, it is the file
``python -m model_zoo import`` writes, with the fine-tuned weights."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from model_zoo.architectures.common import ReIDOutput, classifier_neck
from model_zoo.importers.openvino_ir import (
    DEFAULT_CHANNEL_ORDER,
    IRGraph,
    contract_model,
    embedding_size,
    input_size,
    read_ir,
)
from model_zoo.registry import ARCHITECTURE_REGISTRY, MODEL_OPTIONS_REGISTRY, option, options_of


@MODEL_OPTIONS_REGISTRY.register("openvino_ir")
@dataclass
class ImportedOptions:
    """The ``model.*`` keys only openvino_ir and openvino_ir_cama read."""

    source: Optional[str] = option(
        None,
        "openvino_ir: the OpenVINO IR (.xml beside its .bin) whose graph and weights "
        "the model is; fine-tuned as one branch, its exact per-cell maps exported "
        "(python -m model_zoo import); openvino_ir_cama: the IR whose last stage and head "
        "each branch copies",
    )
    channel_order: Optional[str] = option(
        None, "openvino_ir(_cama): 'bgr' or 'rgb', the order the IR reads (null: BGR, OpenVINO's convention)"
    )


class ImportedEmbedding(nn.Module):
    feature_maps_kind = "attribution"

    def __init__(self, network: nn.Module, dim: int, num_classes: int, bn_neck: bool):
        super().__init__()
        self.network = network
        self.neck = classifier_neck(dim, bn_neck)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def parameter_groups(self):
        """``classifiers``: the new identity classifier (and its neck), which a warm-up trains alone."""
        return {"classifiers": [self.classifier, self.neck]}

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.reference_descriptors(images)

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        out = self.network(images)
        if not self.training:
            return out
        descriptor = out.feature_maps.float().mean(dim=(3, 4))  # the source's own embedding, [B, 1, D]
        return ReIDOutput(
            feature_maps=out.feature_maps, logits=self.classifier(self.neck(descriptor[:, 0])).unsqueeze(1)
        )


def source_graph(model_cfg: dict, architecture: str) -> Tuple[IRGraph, str]:
    """The IR ``model.source`` names, checked against the input size, and the channel order it reads."""
    options = options_of(ImportedOptions, model_cfg)
    if not options.source:
        raise ValueError(f"{architecture} needs model.source: the OpenVINO IR .xml to start from")
    graph = read_ir(options.source)
    if tuple(model_cfg["input_size"]) != input_size(graph):
        raise ValueError(
            f"{Path(options.source).name} reads {input_size(graph)} (H, W) images: set data.height "
            f"and data.width to them"
        )
    return graph, options.channel_order or DEFAULT_CHANNEL_ORDER


@ARCHITECTURE_REGISTRY.register("openvino_ir")
def build_openvino_ir(model_cfg: dict, num_classes: int) -> ImportedEmbedding:
    graph, channel_order = source_graph(model_cfg, "openvino_ir")
    network = contract_model(graph, channel_order)
    return ImportedEmbedding(network, embedding_size(graph), num_classes, model_cfg.get("bn_neck", False))
