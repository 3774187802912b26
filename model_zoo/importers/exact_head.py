"""Contract ``feature_maps`` for an imported embedding model whose head after its last map is piecewise linear.

Such a model computes ``e = head(pool(M))``: ``M`` the last feature map [B, C, h, w], ``pool`` a weighted sum
over the cells (a mean, or OpenVINO's global depthwise convolution), ``head`` layers that are affine (FC,
folded batch norm, biases, reshapes) or piecewise linear per value (ReLU, PReLU, clamp). For one image the
activations' slopes are fixed by the signs of their inputs, so ``e = L(sum_c P_c) + r``: ``P_c`` cell c's share
of the pooled vector, ``L`` the head with those slopes and without its offsets, ``r`` every offset pushed
through. ``f_c = L(h*w * P_c) + (e - mean_c L(h*w * P_c))`` then averages over the cells to ``e`` exactly, so
RAM's grid averages to the retrieval score as for a trained model (model_zoo/CONTRACT.md, "Imported models").
Nothing is approximated: the slopes come from the same pass.
"""

from dataclasses import dataclass
from typing import Callable, List

import torch
from torch import nn

from model_zoo.architectures.common import ReIDOutput


@dataclass
class HeadStep:
    """One layer of the head. ``affine(x)``: the layer as the model runs it. ``linear(y)``: without its offset
    (a bias add becomes the identity). ``slope(x)``: for a piecewise-linear activation, its slope at x, which
    ``linear`` then multiplies by (``linear`` unused); None for an affine layer."""

    affine: Callable[[torch.Tensor], torch.Tensor]
    linear: Callable[[torch.Tensor], torch.Tensor]
    slope: Callable[[torch.Tensor], torch.Tensor] = None


class ExactHeadModel(nn.Module):
    """uint8 RGB [B, H, W, 3] -> ``ReIDOutput`` with one branch: ``feature_maps`` [B, 1, D, h, w], the exact
    per-cell decomposition of the imported model's embedding (its mean over the cells is the embedding).

    ``to_input``: uint8 NHWC RGB -> the source's input (layout, channel order; its own normalisation stays in
    ``trunk``). ``trunk``: input -> M, the module that holds every weight, the head's too. ``cell_shares``: M -> P [B,
    C, h, w], each cell's share of the pooled
    vector (summing over the cells gives the pooled vector without its bias). ``pooled_shape``: the shape
    the head reads, batch first (e.g. (-1, C, 1, 1) or (-1, C)). ``steps``: the head. ``source``: input -> the
    source model's own output, computed its own way (``reference_descriptors``).
    """

    feature_maps_kind = "attribution"

    def __init__(
        self,
        to_input: Callable,
        trunk: nn.Module,
        cell_shares: Callable,
        pooled_shape: tuple,
        steps: List[HeadStep],
        source: Callable,
    ):
        super().__init__()
        self.to_input, self.trunk, self.cell_shares, self.pooled_shape, self.steps = (
            to_input,
            trunk,
            cell_shares,
            pooled_shape,
            steps,
        )
        self.source = source

    def reference_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """The source model's embedding as it computes it, [B, 1, D]: what the maps' grid mean must equal."""
        return self.source(self.to_input(images)).reshape(images.shape[0], 1, -1)

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        shares = self.cell_shares(self.trunk(self.to_input(images)))
        batch, channels, height, width = shares.shape
        cells = height * width
        x = shares.sum(dim=(2, 3)).reshape(self.pooled_shape)
        y = (shares * cells).permute(0, 2, 3, 1).reshape(batch * cells, channels).reshape(self.pooled_shape)
        for step in self.steps:
            slope = None if step.slope is None else step.slope(x).repeat_interleave(cells, dim=0)
            x, y = step.affine(x), step.linear(y) if slope is None else y * slope
        embedding, per_cell = x.reshape(batch, -1), y.reshape(batch, cells, -1)
        maps = per_cell + (embedding - per_cell.mean(dim=1)).unsqueeze(1)
        return ReIDOutput(feature_maps=maps.permute(0, 2, 1).reshape(batch, 1, -1, height, width))
