"""The part of a contract model that adaptation trains: one linear map per branch, applied at every cell of
the branch's feature map, started at the identity (so epoch 0 is the source model exactly).

Why a per-cell linear head on a frozen trunk: it runs on any contract file (imported ones included, whose
trunks cannot be trained on a CPU in useful time); a linear map commutes with the grid mean, so the adapted
embedding is still normalize(mean of the adapted maps) and RAM stays exact; and training needs each crop's
pooled maps only, computed once, so an epoch costs milliseconds, not a pass of the network.

``append_head`` writes the head into the source ONNX graph: the source's ``feature_maps`` go through the
head, and ``embedding`` is rebuilt from the result, so the file follows the contract unchanged."""

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from model_zoo.contract import OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS

NORM_EPSILON = 1e-12  # torch's F.normalize floor


class BranchLinearHead(nn.Module):
    """F'_i(x, y) = W_i F_i(x, y) + b_i for each branch i; W_i starts at the identity, b_i at zero."""

    def __init__(self, num_branches: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim).repeat(num_branches, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_branches, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled source maps [B, N, D] (grid means) -> the adapted embedding [B, N*D], each branch normalised."""
        adapted = torch.einsum("bnd,ned->bne", pooled, self.weight) + self.bias
        return F.normalize(adapted, dim=2, eps=NORM_EPSILON).flatten(1)

    def maps(self, source_maps: torch.Tensor) -> torch.Tensor:
        """The head at every cell: source maps [B, N, D, h, w] -> adapted maps, whose grid mean is forward's."""
        return torch.einsum("bndhw,ned->bnehw", source_maps, self.weight) + self.bias[..., None, None]

    def distance_from_identity(self) -> torch.Tensor:
        """||W - I||^2 + ||b||^2: how far the head has moved the source model (the anchor term's penalty)."""
        identity = torch.eye(self.weight.shape[1]).expand_as(self.weight)
        return (self.weight - identity).pow(2).sum() + self.bias.pow(2).sum()


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no output needs (the source's own embedding branch)."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _reduce(op: str, source: str, output: str, axes_name: str, axes: list, keepdims: int, opset: int):
    """A reduction over ``axes``: an attribute before opset 18, an input from 18 on."""
    if opset >= 18:
        return helper.make_node(op, [source, axes_name], [output], keepdims=keepdims)
    return helper.make_node(op, [source], [output], axes=axes, keepdims=keepdims)


def append_head(model: onnx.ModelProto, head: BranchLinearHead) -> onnx.ModelProto:
    """A copy of a contract model with ``head`` applied to its feature maps and its embedding rebuilt."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next(entry.version for entry in out.opset_import if entry.domain in ("", "ai.onnx"))
    source_maps = "adaptation/source_feature_maps"
    renamed = {OUTPUT_FEATURE_MAPS: source_maps, OUTPUT_EMBEDDING: "adaptation/source_embedding"}
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    weight = head.weight.detach().numpy()
    num_branches, dim = weight.shape[:2]
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, "adaptation/weight"),
            numpy_helper.from_array(head.bias.detach().numpy().reshape(1, num_branches, dim, 1, 1), "adaptation/bias"),
            numpy_helper.from_array(np.array([NORM_EPSILON], np.float32), "adaptation/epsilon"),
            numpy_helper.from_array(np.array([0, num_branches * dim], np.int64), "adaptation/embedding_shape"),
            numpy_helper.from_array(np.array([3, 4], np.int64), "adaptation/grid_axes"),
            numpy_helper.from_array(np.array([2], np.int64), "adaptation/channel_axis"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Einsum", [source_maps, "adaptation/weight"], ["adaptation/mapped"], equation="bndhw,ned->bnehw"
            ),
            helper.make_node("Add", ["adaptation/mapped", "adaptation/bias"], [OUTPUT_FEATURE_MAPS]),
            _reduce(
                "ReduceMean",
                OUTPUT_FEATURE_MAPS,
                "adaptation/pooled",
                "adaptation/grid_axes",
                [3, 4],
                keepdims=0,
                opset=opset,
            ),
            _reduce(
                "ReduceL2",
                "adaptation/pooled",
                "adaptation/norm",
                "adaptation/channel_axis",
                [2],
                keepdims=1,
                opset=opset,
            ),
            helper.make_node("Max", ["adaptation/norm", "adaptation/epsilon"], ["adaptation/norm_floor"]),
            helper.make_node("Div", ["adaptation/pooled", "adaptation/norm_floor"], ["adaptation/normalised"]),
            helper.make_node(
                "Reshape", ["adaptation/normalised", "adaptation/embedding_shape"], [OUTPUT_EMBEDDING], allowzero=0
            ),
        ]
    )
    _prune(graph)
    return out
