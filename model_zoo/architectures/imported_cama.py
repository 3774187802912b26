"""CAMA on an imported Open Model Zoo IR (issue: strong pretrained trunks): the IR's layers up to its last stage
are the shared trunk; each of N ordered branches is its own copy of the last stage and of the IR's head, so
every branch starts as the imported model itself and CAMA's OAP moves them onto different regions. Each
branch's maps are the exact per-cell decomposition of its embedding (``model_zoo.importers.exact_head``), so
GAP gives the embedding and RAM stays exact after export. Training only: a bias-free classifier reads the
embedding, through a batch norm with ``bn_neck`` (the IR's embeddings are not batch-normalised, as CAMA's F
is; on their raw scale a first pool run's identity loss stayed at chance for a third of its warm-up). The
neck is a per-channel affine, so applied at each cell it gives class activation maps W_t . neck(F) that
still average to the class scores (CAMA eq. 4). The embedding is CAMA's: the concatenation of the branches'
L2-normalised embeddings."""

from typing import Tuple

import torch
from torch import nn

from model_zoo.architectures.common import ReIDOutput, class_activation_maps, classifier_neck
from model_zoo.architectures.imported import source_graph
from model_zoo.importers.exact_head import ExactHeadModel
from model_zoo.importers.openvino_ir import IRGraph, IRHead, IRNetwork, embedding_size, ir_input, last_stage_start
from model_zoo.registry import ARCHITECTURE_REGISTRY


class IRBranch(nn.Module):
    """The IR from ``start`` to its output, its maps decomposed per cell, with an identity classifier."""

    def __init__(self, graph: IRGraph, start: str, num_classes: int, bn_neck: bool):
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
        self.neck = classifier_neck(embedding_size(graph), bn_neck)
        self.classifier = nn.Linear(embedding_size(graph), num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        return self.maps(shared).feature_maps[:, 0]

    def neck_affine(self, embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The neck as (scale, shift) per channel, with the statistics it uses now (the batch's in training)."""
        if isinstance(self.neck, nn.Identity):
            return torch.ones_like(embeddings[0]), torch.zeros_like(embeddings[0])
        bn = self.neck
        if bn.training:
            mean, var = embeddings.mean(dim=0), embeddings.var(dim=0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        scale = bn.weight / torch.sqrt(var + bn.eps)
        return scale, bn.bias - mean * scale


class ImportedCAMA(nn.Module):
    feature_maps_kind = "attribution"

    def __init__(self, graph: IRGraph, channel_order: str, num_branches: int, num_classes: int, bn_neck: bool):
        super().__init__()
        if num_branches < 1:
            raise ValueError("num_branches must be at least 1")
        start = last_stage_start(graph, IRHead(graph).map_layer)
        self.to_input = ir_input(channel_order)
        self.trunk = IRNetwork(graph, until=start, head_weights=False)
        self.branches = nn.ModuleList(IRBranch(graph, start, num_classes, bn_neck) for _ in range(num_branches))

    def parameter_groups(self):
        """``classifiers``: the classifiers and their necks, which the warm-up trains alone."""
        return {"classifiers": [part for branch in self.branches for part in (branch.classifier, branch.neck)]}

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        shared = self.trunk(self.to_input(images))
        maps = torch.stack([branch(shared) for branch in self.branches], dim=1)
        if not self.training:
            return ReIDOutput(feature_maps=maps)
        gap = maps.float().mean(dim=(3, 4))
        logits = torch.stack([branch.classifier(branch.neck(gap[:, i])) for i, branch in enumerate(self.branches)], 1)
        return ReIDOutput(feature_maps=maps, logits=logits)

    def target_activation_maps(self, feature_maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """M^i_t = W^i_t . neck^i(F^i) at each cell (eq. 4 through the neck's affine): [B, N, h, w]."""
        gap = feature_maps.float().mean(dim=(3, 4))
        maps = []
        for i, branch in enumerate(self.branches):
            scale, shift = branch.neck_affine(gap[:, i])
            weights = branch.classifier.weight[targets]
            offset = (weights * shift).sum(dim=1).view(-1, 1, 1)
            maps.append(class_activation_maps(feature_maps[:, i], weights * scale) + offset)
        return torch.stack(maps, dim=1)

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Each branch's embedding as the IR computes it (its own pooling and head), [B, N, D]."""
        shared = self.trunk(self.to_input(images))
        return torch.stack([branch.maps.source(shared).reshape(len(images), -1) for branch in self.branches], dim=1)


@ARCHITECTURE_REGISTRY.register("openvino_ir_cama")
def build_openvino_ir_cama(model_cfg: dict, num_classes: int) -> ImportedCAMA:
    graph, channel_order = source_graph(model_cfg, "openvino_ir_cama")
    return ImportedCAMA(graph, channel_order, model_cfg["num_branches"], num_classes, model_cfg.get("bn_neck", False))
