"""CAMA on an imported Open Model Zoo IR (issue: strong pretrained trunks): the IR's layers up to its last stage
are the shared trunk; each of N ordered branches is its own copy of the last stage and of the IR's head, so
every branch starts as the imported model itself and CAMA's OAP moves them onto different regions. Each
branch's maps are the exact per-cell decomposition of its embedding (``model_zoo.importers.exact_head``), so
GAP gives the embedding, a bias-free classifier on it gives the class scores and W_t . F the class activation
map (CAMA eq. 4), and RAM stays exact after export. The embedding is CAMA's: the concatenation of the
branches' L2-normalised embeddings."""

from pathlib import Path

import torch
from torch import nn

from model_zoo.architectures.cama import BranchClassifiers
from model_zoo.architectures.common import ReIDOutput
from model_zoo.architectures.imported import ImportedOptions
from model_zoo.importers.exact_head import ExactHeadModel
from model_zoo.importers.openvino_ir import (
    DEFAULT_CHANNEL_ORDER,
    IRGraph,
    IRHead,
    IRNetwork,
    embedding_size,
    input_size,
    ir_input,
    last_stage_start,
    read_ir,
)
from model_zoo.registry import ARCHITECTURE_REGISTRY, options_of


class IRBranch(nn.Module):
    """The IR from ``start`` to its output, its maps decomposed per cell, with an identity classifier."""

    def __init__(self, graph: IRGraph, start: str, num_classes: int):
        super().__init__()
        head = IRHead(graph)
        network = IRNetwork(graph, until=head.map_layer, start=start)
        self.maps = ExactHeadModel(
            nn.Identity(),
            network,
            head.cell_shares(network),
            head.pooled_shape(),
            head.steps(network),
            network.source_output,
        )
        self.classifier = nn.Linear(embedding_size(graph), num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        return self.maps(shared).feature_maps[:, 0]


class ImportedCAMA(BranchClassifiers, nn.Module):
    feature_maps_kind = "attribution"

    def __init__(self, graph: IRGraph, channel_order: str, num_branches: int, num_classes: int):
        super().__init__()
        if num_branches < 1:
            raise ValueError("num_branches must be at least 1")
        start = last_stage_start(graph, IRHead(graph).map_layer)
        self.to_input = ir_input(channel_order)
        self.trunk = IRNetwork(graph, until=start, head_weights=False)
        self.branches = nn.ModuleList(IRBranch(graph, start, num_classes) for _ in range(num_branches))

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        shared = self.trunk(self.to_input(images))
        maps = torch.stack([branch(shared) for branch in self.branches], dim=1)
        if not self.training:
            return ReIDOutput(feature_maps=maps)
        return ReIDOutput(feature_maps=maps, logits=self.branch_logits(maps))

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Each branch's embedding as the IR computes it (its own pooling and head), [B, N, D]."""
        shared = self.trunk(self.to_input(images))
        return torch.stack([branch.maps.source(shared).reshape(len(images), -1) for branch in self.branches], dim=1)


@ARCHITECTURE_REGISTRY.register("openvino_ir_cama")
def build_openvino_ir_cama(model_cfg: dict, num_classes: int) -> ImportedCAMA:
    options = options_of(ImportedOptions, model_cfg)
    if not options.source:
        raise ValueError("openvino_ir_cama needs model.source: the OpenVINO IR .xml whose branches it copies")
    if model_cfg.get("bn_neck"):
        raise ValueError("openvino_ir_cama's classifiers read the branch embeddings directly (CAMA eq. 4): no bn_neck")
    graph = read_ir(options.source)
    if tuple(model_cfg["input_size"]) != input_size(graph):
        raise ValueError(
            f"{Path(options.source).name} reads {input_size(graph)} (H, W) images: set data.height "
            f"and data.width to them"
        )
    return ImportedCAMA(graph, options.channel_order or DEFAULT_CHANNEL_ORDER, model_cfg["num_branches"], num_classes)
