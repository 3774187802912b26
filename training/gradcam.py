"""Grad-CAM inside a training step (design: shared/design/paper-family.md, capability C9).

PMM ranks blocks of a detached Grad-CAM map to choose what to mix; CASN's attention loss L_ia needs a map that is
differentiable in the activations. Given a scalar ``score`` (for example the batch sum of each image's target-class
logit) computed from activations A [B, C, h, w]:

    w_k = mean_xy dScore/dA_k(x, y)       (per image; no other image's term depends on A_b unless BatchNorm
                                            in training mode couples the batch, which PMM's code keeps)
    map = ReLU(sum_k w_k A_k)             [B, h, w]

The gradient comes from ``torch.autograd.grad(..., retain_graph=True)``, so no parameter's ``.grad`` is touched
and the graph stays for the step's own backward (PMM's code calls ``.backward()`` and relies on a later
``zero_grad``). The weights are always detached; ``mode`` says whether the map is:

* ``"detached"``: a constant (PMM);
* ``"differentiable"``: differentiable in A through ``sum_k w_k A_k`` only (CASN's L_ia).

When the head is linear in A (GAP then a linear classifier), Grad-CAM has a closed form: the weights are the
class's classifier row divided by hw, so the map is ReLU(CAM_t) / hw with CAM_t = W_t . A, the class activation
map that CAMA's ``target_activation_maps`` builds per branch (model_zoo.architectures.common.class_activation_maps).
``linear_head_cam`` is that form (CASN's L_sa); it needs no backward at all.
"""

import torch
import torch.nn.functional as F

from model_zoo.architectures.common import class_activation_maps

MODES = ("detached", "differentiable")
# Under fp16 autocast, dScore/dA for a logit of a small classifier (weights ~1e-3, divided over the grid) sits
# below fp16's smallest normal (6e-5), where it keeps few digits or underflows. The backward keeps the dtypes the
# forward recorded, so wrapping autograd.grad in autocast(enabled=False) would change nothing; scaling the score
# by a power of two does (as a GradScaler does), is exact in every dtype, and is undone in fp32 after. The scaled
# gradient overflows fp16 (65504) only where |dScore/dA| > 64, far above any classifier's; bf16 has fp32's range,
# where the scale is harmless. The weighted sum itself is computed in fp32 from A cast up, autocast off.
SCORE_SCALE = 2.0**10


def _full_precision(tensor: torch.Tensor):
    """Autocast off on the tensor's device: an einsum under autocast would run in bf16/fp16 despite fp32 inputs."""
    return torch.autocast(tensor.device.type, enabled=False)


def grad_cam(score: torch.Tensor, activations: torch.Tensor, mode: str = "detached") -> torch.Tensor:
    """Grad-CAM maps [B, h, w] of the scalar ``score`` with respect to ``activations`` [B, C, h, w], in fp32.

    ``mode``: "detached" (no graph) or "differentiable" (a graph into ``activations`` only; the weights are
    constants). Parameter ``.grad`` fields are left as they are, and the graph is retained for a later backward.
    """
    if mode not in MODES:
        raise ValueError(f"unknown Grad-CAM mode {mode!r}; known: {', '.join(MODES)}")
    if score.dim() != 0:
        raise ValueError(f"score must be a scalar, got shape {tuple(score.shape)}")
    (gradient,) = torch.autograd.grad(score.float() * SCORE_SCALE, activations, retain_graph=True)
    weights = gradient.float().mean(dim=(2, 3)) / SCORE_SCALE  # [B, C], detached: create_graph is off
    source = activations.detach() if mode == "detached" else activations
    with _full_precision(activations):
        return F.relu(torch.einsum("bchw,bc->bhw", source.float(), weights))


def linear_head_cam(activations: torch.Tensor, class_weights: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Closed-form Grad-CAM for a head linear in A (``score_b = <w_b, GAP(A_b)> + bias``): [B, h, w], fp32.

    ``class_weights`` [B, C]: each image's target-class row of the classifier (``classifier.weight[targets]``).
    Returns ``ReLU(w_b . A_b) / hw`` (without the ReLU if ``relu`` is False), equal to ``grad_cam`` on that head,
    and differentiable in both A and the weights."""
    with _full_precision(activations):
        cam = class_activation_maps(activations, class_weights) / (activations.shape[-2] * activations.shape[-1])
    return F.relu(cam) if relu else cam
