"""Building contract maps F^i for any per-branch descriptor (design: shared/design/paper-family.md, section 0.2).

The contract (model_zoo/CONTRACT.md) says ``embedding[i] = normalize(mean_xy F^i(x, y))``, and the Ranking
Activation Map ``R^i(x, y) = <e_q^i, F_g^i(x, y)> / ||mean_xy F_g^i||`` (model_zoo/ram.py) averages over the grid
to the branch cosine. Both need one thing only: ``mean_xy F^i == f^i``, the paper's descriptor before
normalisation (any positive scale). F^i need not be an activation map: any exact additive per-cell decomposition
of f^i keeps the embedding rule and RAM exact. The functions here build such decompositions, one rule each; all
take and return maps ``[..., D, h, w]`` and their grid mean equals the descriptor the rule names:

* R1 ``affine_map``: ``A . mean(F) + c`` (1x1 conv, linear, eval-mode BatchNorm; ``as_affine`` reads them).
* R2 ``region_map`` with ``stripe_masks`` / ``block_masks``: the mean over a region (stripe, block).
* R3 ``weighted_map``: ``sum w F / sum w``.
* R4 ``selection_map``: a value picked per channel (max, min, median), ties split evenly over the tied cells;
  ``selection_margin`` is its top-2 gap, which the exporter's parity rule for attribution maps reads.
* R5 ``variance_map``: the population variance per channel.
* R6 ``cosine_distance_map``: ``1 - cos`` of two maps per channel.
* R7 ``relu_gate`` / ``nonlinearity_gate``: an element-wise non-linearity after pooling.
* R8 ``upsample_nearest``: integer nearest-neighbour upsampling (mixed strides).
* R9 ``concat_maps``: several sub-descriptors in one branch.

Maps built with R3-R7 are exact attributions, not activations: an architecture using them declares
``feature_maps_kind = "attribution"``. They are built in eval/export mode; training computes descriptors
directly. Everything exports to ONNX (opset 17) without Python loops over data.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn


def grid_mean(maps: torch.Tensor) -> torch.Tensor:
    """The descriptor a contract map stands for: its mean over the grid, [..., D]."""
    return maps.mean(dim=(-2, -1))


def _cells(maps: torch.Tensor) -> int:
    return maps.shape[-2] * maps.shape[-1]


# R1 ------------------------------------------------------------------------------------------------------------
def as_affine(module: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(A, c) of a module that is affine per cell, for ``affine_map``: Linear and 1x1 Conv2d give A [D, D'],
    an eval-mode BatchNorm its per-channel scale A [D] (a diagonal); c is [D] or None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1) or module.groups != 1:
            raise ValueError("only a 1x1 convolution without groups is affine per cell")
        return module.weight.flatten(1), module.bias
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            raise ValueError("a BatchNorm is affine per cell only in eval mode with running statistics")
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.affine:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.affine:
            shift = shift + module.bias
        return scale, shift
    raise TypeError(f"{type(module).__name__} is not an affine module")


def affine_map(maps: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R1: ``A . F(x, y) + c`` per cell ([..., D', h, w] -> [..., D, h, w]), whose mean is ``A . mean(F) + c``:
    the constant term spreads uniformly over the grid. ``weight``: A [D, D'], or [D] for a diagonal A."""
    weight = weight.to(maps.dtype)
    out = maps * weight[:, None, None] if weight.dim() == 1 else torch.einsum("ek,...khw->...ehw", weight, maps)
    return out if bias is None else out + bias.to(maps.dtype)[:, None, None]


# R2 ------------------------------------------------------------------------------------------------------------
def _bands(size: int, parts: int) -> torch.Tensor:
    """[parts, size] membership of adaptive pooling's bins: bin i covers [floor(i n / p), ceil((i + 1) n / p))."""
    index = torch.arange(size)
    starts = torch.tensor([(i * size) // parts for i in range(parts)])
    ends = torch.tensor([-((-(i + 1) * size) // parts) for i in range(parts)])
    return (index >= starts[:, None]) & (index < ends[:, None])


def stripe_masks(height: int, width: int, parts: int) -> torch.Tensor:
    """[parts, h, w] horizontal stripes, the bins of ``adaptive_avg_pool2d(x, (parts, 1))`` (PCB)."""
    return _bands(height, parts)[:, :, None].expand(parts, height, width)


def block_masks(height: int, width: int, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, h, w] blocks, row-major: the bins of ``adaptive_avg_pool2d(x, (rows, cols))``."""
    masks = _bands(height, rows)[:, None, :, None] & _bands(width, cols)[None, :, None, :]
    return masks.reshape(rows * cols, height, width)


def region_map(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R2: ``(hw / |R|) . 1[(x, y) in R] . F(x, y)``, whose mean is the mean of F over the region R.

    ``mask``: [h, w] (or broadcastable to maps without the D axis, e.g. [B, h, w]) boolean or 0/1."""
    mask = mask.to(maps.dtype)
    size = mask.sum(dim=(-2, -1), keepdim=True)
    return maps * (_cells(maps) * mask / size).unsqueeze(-3)


# R3 ------------------------------------------------------------------------------------------------------------
def weighted_map(maps: torch.Tensor, weights: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """R3: ``hw . w(x, y) . F(x, y) / (sum w + eps)``, whose mean is the weighted average ``sum w F / (sum w + eps)``;
    ``eps`` > 0 guards non-negative weights that may all be 0 (the map and its mean are then 0).

    ``weights``: [..., h, w] (one weight map for every channel) or [..., D, h, w] (one per channel)."""
    if weights.dim() == maps.dim() - 1:
        weights = weights.unsqueeze(-3)
    weights = weights.to(maps.dtype)
    return maps * (_cells(maps) * weights / (weights.sum(dim=(-2, -1), keepdim=True) + eps))


# R4 ------------------------------------------------------------------------------------------------------------
SELECTIONS = ("max", "min", "median")


def selected_values(maps: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """The value each channel picks, [..., D]: its max, min or lower median over the grid (``torch.median``'s)."""
    flat = maps.flatten(-2)
    if mode == "max":
        return flat.amax(dim=-1)
    if mode == "min":
        return flat.amin(dim=-1)
    if mode == "median":
        # The k-th smallest value, k = ceil(n / 2) (the lower median), as the largest of the k smallest: TopK then
        # ReduceMax (ONNX has no median; indexing TopK's last value by -1 exported to a wrong Gather index).
        return flat.topk((flat.shape[-1] + 1) // 2, dim=-1, largest=False).values.amax(dim=-1)
    raise ValueError(f"unknown selection {mode!r}; known: {', '.join(SELECTIONS)}")


def selection_map(maps: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """R4: ``hw . v_c . s_c(x, y)`` with v_c the channel's selected value and s_c the indicator of the cells equal
    to v_c divided by their count (ties split evenly); its mean is v_c (GMP for ``max``). Exports as
    ReduceMax/ReduceMin (TopK for the median), Equal, Cast and ReduceSum."""
    values = selected_values(maps, mode)[..., None, None]
    chosen = (maps == values).to(maps.dtype)
    share = chosen / chosen.sum(dim=(-2, -1), keepdim=True)
    return _cells(maps) * values * share


def selection_margin(maps: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """How firmly each channel's selection is decided, [..., D]: the gap between the selected value and the next
    one (for the median, the nearer neighbour in sorted order), divided by ``max(1, max |F|)`` over the image's
    channels and cells. Below about 1e-5 the two runtimes may pick different cells (a moved spike): the
    exporter's parity rule for attribution maps leaves such channels out of the map comparison."""
    flat = maps.flatten(-2)
    ordered = flat.sort(dim=-1).values
    if mode == "max":
        gap = ordered[..., -1] - ordered[..., -2]
    elif mode == "min":
        gap = ordered[..., 1] - ordered[..., 0]
    elif mode == "median":
        k = (flat.shape[-1] + 1) // 2 - 1
        below = ordered[..., k] - ordered[..., max(k - 1, 0)]
        above = ordered[..., min(k + 1, flat.shape[-1] - 1)] - ordered[..., k]
        gap = torch.minimum(below, above)
    else:
        raise ValueError(f"unknown selection {mode!r}; known: {', '.join(SELECTIONS)}")
    scale = flat.abs().flatten(-2).amax(dim=-1).clamp(min=1.0)
    return gap / scale[..., None]


# R5 ------------------------------------------------------------------------------------------------------------
def variance_map(maps: torch.Tensor) -> torch.Tensor:
    """R5: ``(F(x, y) - mu)^2`` with mu the image's channel mean, whose mean is the population variance."""
    return (maps - grid_mean(maps)[..., None, None]).square()


# R6 ------------------------------------------------------------------------------------------------------------
def cosine_distance_map(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """R6: ``1 - hw . Z1(x, y) Z2(x, y) / (||Z1_c|| ||Z2_c||)`` per channel (norms over the grid), whose mean is
    the cosine distance ``1 - cos(Z1_c, Z2_c)``; the constant 1 spreads over the grid."""
    norms = first.flatten(-2).norm(dim=-1) * second.flatten(-2).norm(dim=-1)
    return 1 - _cells(first) * first * second / norms.clamp(min=eps)[..., None, None]


# R7 ------------------------------------------------------------------------------------------------------------
def relu_gate(maps: torch.Tensor) -> torch.Tensor:
    """R7 for ReLU: channel c times ``1[f_c > 0]`` (f = the grid mean), whose mean is ``ReLU(f)``."""
    return maps * (grid_mean(maps) > 0).to(maps.dtype)[..., None, None]


def nonlinearity_gate(maps: torch.Tensor, sigma: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """R7: channel c times ``sigma(f_c) / f_c`` (f = the grid mean), whose mean is ``sigma(f)``: the head is
    linearised at the image's own point. Where f_c == 0 the map (mean 0) is kept and ``sigma(0)`` spreads over
    the grid, so the mean is still ``sigma(f_c)`` and nothing divides by zero. Layer by layer (R1 then R7) this
    decomposes any MLP on a pooled vector exactly."""
    pooled = grid_mean(maps)
    activated = sigma(pooled)
    zero = pooled == 0
    ratio = torch.where(zero, torch.ones_like(pooled), activated / torch.where(zero, torch.ones_like(pooled), pooled))
    constant = torch.where(zero, activated, torch.zeros_like(pooled))
    return maps * ratio[..., None, None] + constant[..., None, None]


# R8, R9 --------------------------------------------------------------------------------------------------------
def upsample_nearest(maps: torch.Tensor, factor: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """R8: nearest-neighbour upsampling by integer factors (fy, fx), which keeps the grid mean: every cell is
    repeated fy . fx times. Brings a coarser branch (a larger stride) to the shared h x w."""
    fy, fx = (factor, factor) if isinstance(factor, int) else factor
    if int(fy) != fy or int(fx) != fx or fy < 1 or fx < 1:
        raise ValueError(f"upsampling factors must be positive integers, got {factor}")
    return maps.repeat_interleave(int(fy), dim=-2).repeat_interleave(int(fx), dim=-1)


def concat_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """R9: sub-descriptors' maps concatenated along D into one branch; the mean is the concatenated descriptor."""
    grids = {tuple(m.shape[-2:]) for m in maps}
    if len(grids) != 1 and not torch.jit.is_tracing():  # traced shapes are tensors; torch.cat checks them there
        raise ValueError(f"maps to concatenate need one grid, got {sorted(grids)}; upsample first (R8)")
    return torch.cat(list(maps), dim=-3)
