"""CASN's objective (eq. 6): L = L_ide + lambda_1 L_ia + lambda_2 (L_bce + alpha_sa L_consistency), on batches of
image pairs ``[a_1, b_1, a_2, b_2, ...]`` (``data.sampler: pairs``; a pair is positive when its labels match).

Terms and weights (``loss.casn_*``; the paper's lambda_1 = 0.5, lambda_2 = 0.05, alpha_sa = 0.2):
- ``loss_ide`` (1): cross-entropy of the identity logits (summed over PCB's stripes).
- ``loss_ia`` (lambda_1), identification attention, GAIN-style (eq. 2): Grad-CAM M of the true class's score
  with respect to A, differentiable in A with detached weights; the soft mask Sigma = sigmoid(omega (M^ - sigma)),
  M^ = M / max M upsampled to the image; a second forward of I (1 - Sigma) (normalised, so masked = mean colour);
  the term is the softmax probability of the true class on it, which training drives down: the attention must
  cover everything that identifies the person.
- ``loss_pair`` (lambda_2): 2-way cross-entropy of the pair head on f_a - f_b (eq. 3).
- ``loss_consistency`` (lambda_2 alpha_sa), on positive pairs only (eq. 5): the pair head's indicator a =
  1[dz_1/df^- > 0] (detached), each image's Siamese Grad-CAM M_j = ReLU(sum_k w_k A_j^k) in closed form (w_k =
  the a of channel k, summed over stripes, / hw), max-normalised, max-pooled over each row, cropped to the rows
  above ``loss.casn_row_threshold`` and resized to the map's height (vertical alignment); the L2 distance of
  the two profiles. A pair with an all-zero map is skipped.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from model_zoo.registry import option
from training.gradcam import grad_cam, linear_head_cam
from training.losses import IdentificationLoss
from training.objectives.base import LOSS_OPTIONS_REGISTRY, OBJECTIVE_REGISTRY, Objective


@LOSS_OPTIONS_REGISTRY.register("casn")
@dataclass
class CASNLossOptions:
    """The ``loss.*`` keys only the casn objective reads."""

    casn_ia_weight: float = option(
        0.5,
        "CASN: lambda_1, weight of the identification-attention term (the true class's "
        "probability on the attention-masked image)",
    )
    casn_sa_weight: float = option(
        0.05,
        "CASN: lambda_2, weight of the Siamese terms (pair cross-entropy, and with "
        "casn_consistency_weight the consistency)",
    )
    casn_consistency_weight: float = option(
        0.2, "CASN: alpha_sa, weight of the attention consistency inside the Siamese term"
    )
    casn_mask_scale: float = option(10.0, "CASN: omega, the soft mask's sharpness, sigmoid(omega (M - sigma))")
    casn_mask_threshold: float = option(0.5, "CASN: sigma, the soft mask's threshold on the max-normalised attention")
    casn_row_threshold: float = option(
        0.3, "CASN: t, the rows of a max-normalised attention profile kept for alignment"
    )


def soft_mask(attention: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """Sigma(M) = sigmoid(omega (M - sigma)) on a [0, 1] map."""
    return torch.sigmoid(scale * (attention - threshold))


def max_normalized(maps: torch.Tensor) -> torch.Tensor:
    """Each [h, w] map divided by its maximum (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
    return maps / peak.view(-1, *[1] * (maps.dim() - 1))


def aligned_profile(profile: torch.Tensor, threshold: float, length: int) -> Optional[torch.Tensor]:
    """The part of a row profile [h] from its first to its last value above ``threshold``, linearly resized to
    ``length`` (align_corners): two views of one person shifted vertically give one profile. None when no
    value is above the threshold. The crop indices are not differentiable; the values are."""
    above = torch.nonzero(profile > threshold).flatten()
    if len(above) == 0:
        return None
    crop = profile[above[0] : above[-1] + 1]
    return F.interpolate(crop.view(1, 1, -1), size=length, mode="linear", align_corners=True).flatten()


def pair_indicator(pair_logits: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """a = 1[d z_1 / d f^- > 0] per pair (eq. 4), detached; the graph is kept for the step's backward."""
    (gradient,) = torch.autograd.grad(pair_logits[:, 1].sum(), difference, retain_graph=True)
    return (gradient > 0).float()


@OBJECTIVE_REGISTRY.register("casn")
class CASNObjective(Objective):
    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        return f"CASN ({model.get('layout', 'ide')})"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)

    def default_weights(self) -> Dict[str, float]:
        loss = self.cfg.loss
        return {
            "loss_ide": 1.0,
            "loss_ia": loss.casn_ia_weight,
            "loss_pair": loss.casn_sa_weight,
            "loss_consistency": loss.casn_sa_weight * loss.casn_consistency_weight,
        }

    def terms(self, out, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        compute = {
            "loss_ide": lambda: self.id_loss(out.logits, targets),
            "loss_ia": lambda: self.identification_attention(out, targets),
        }
        values = {name: compute[name]() for name in active & set(compute)}
        if active & {"loss_pair", "loss_consistency"}:
            pair, consistency = self.siamese_terms(out, targets)
            values.update({"loss_pair": pair, "loss_consistency": consistency})
        return {name: value for name, value in values.items() if name in active}

    def identification_attention(self, out, targets: torch.Tensor) -> torch.Tensor:
        loss, maps, images = self.cfg.loss, out.aux["maps"], out.aux["images"]
        score = out.logits.gather(2, targets.view(-1, 1, 1).expand(-1, out.logits.shape[1], 1)).sum()
        attention = max_normalized(grad_cam(score, maps, "differentiable"))
        attention = F.interpolate(attention.unsqueeze(1), size=images.shape[2:], mode="bilinear", align_corners=False)
        masked = images * (1 - soft_mask(attention, loss.casn_mask_scale, loss.casn_mask_threshold)).to(images.dtype)
        masked_logits = self.model.heads(self.model.backbone_map(masked))[1].sum(dim=1)
        return masked_logits.float().softmax(dim=1).gather(1, targets.view(-1, 1)).mean()

    def siamese_terms(self, out, targets: torch.Tensor):
        features, maps = out.aux["siamese"], out.aux["maps"]
        difference = features[0::2] - features[1::2]
        pair_logits = self.model.pair_head(difference)
        same = targets[0::2] == targets[1::2]
        pair_loss = F.cross_entropy(pair_logits.float(), same.long())
        channel_weights = pair_indicator(pair_logits, difference).view(len(difference), -1, maps.shape[1]).sum(dim=1)
        return pair_loss, self.consistency(maps, channel_weights, same)

    def consistency(self, maps: torch.Tensor, channel_weights: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """Mean L2 distance of the aligned row profiles of each positive pair's Siamese attention maps."""
        threshold, height = self.cfg.loss.casn_row_threshold, maps.shape[2]
        distances = []
        for pair in torch.nonzero(same).flatten().tolist():
            attention = linear_head_cam(maps[2 * pair : 2 * pair + 2], channel_weights[pair].expand(2, -1))
            profiles = [aligned_profile(p, threshold, height) for p in max_normalized(attention).amax(dim=2)]
            if all(p is not None for p in profiles):
                distances.append(torch.linalg.vector_norm(profiles[0] - profiles[1]))
        return torch.stack(distances).mean() if distances else maps.new_zeros((), dtype=torch.float32)
