"""CLPD's objective (eq. 16) and its concentration losses (design: shared/design/paper-family.md, 4.2).

Terms: ``loss_global`` and ``loss_local``, the cross-entropy of the global and the local classifier (with
``loss.label_smoothing``, 0 in the paper); ``loss_ratio`` x ``loss.clpd_ratio_weight`` (lambda = 0.1), the
activation-ratio loss L_r (eq. 6); ``loss_distribution`` x ``loss.clpd_distribution_weight`` (eta = 1.0), the
activation-distribution loss L_d (eq. 8-11). L_r and L_d are computed per attention module with its own
candidate count K = round(ratio x h x w) (``loss.clpd_candidate_ratios``: two modules at 20%, four at 30%, two
at 40%), summed over the modules and averaged over the batch (design 4.6.5: the paper does not say; averaging
over the modules would divide lambda and eta by N).

Step 1 of the paper's schedule (``training/configs/clpd.yaml``) switches the local terms off through
``loss_weights``; while they are off the local branch is not run at all.

Not in the paper, for the multi-source recipe (``clpd_pool.yaml``): ``loss_tri`` x ``loss.triplet_weight``,
batch-hard triplet on the L2-normalised u_g and u_l (u_g alone while the local branch is not run).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from model_zoo.architectures.common import branch_features
from model_zoo.registry import option
from training.losses import BatchHardTripletLoss, IdentificationLoss
from training.objectives.base import GlobalFirstObjective, LOSS_OPTIONS_REGISTRY, OBJECTIVE_REGISTRY

LOCAL_TERMS = ("loss_local", "loss_ratio", "loss_distribution")


@LOSS_OPTIONS_REGISTRY.register("clpd")
@dataclass
class CLPDLossOptions:
    """The ``loss.*`` keys only the clpd objective reads."""

    clpd_ratio_weight: float = option(
        0.1, "CLPD: lambda, weight of the activation-ratio loss L_r (eq. 6), summed over the attention modules (0: off)"
    )
    clpd_distribution_weight: float = option(
        1.0,
        "CLPD: eta, weight of the activation-distribution loss L_d (eq. 10), "
        "summed over the attention modules (0: off)",
    )
    clpd_candidate_ratios: List[float] = option(
        [0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.4, 0.4],
        "CLPD: per attention module, its candidates' share of the grid's cells (K = round(ratio x h x w)); one per "
        "part",
    )


def candidate_counts(ratios: Sequence[float], cells: int) -> List[int]:
    """K per attention module: round(ratio x cells) (Python's round), at least 1."""
    return [max(1, round(ratio * cells)) for ratio in ratios]


def activation_ratio_loss(maps: torch.Tensor, k: int) -> torch.Tensor:
    """L_r (eq. 6) per image, [B, h, w] -> [B]: 1 - (sum of the K largest values) / (sum of all values).
    Autograd gives eq. 7: (S_K - S) / S^2 on the candidates, S_K / S^2 elsewhere."""
    flat = maps.flatten(1)
    return 1 - flat.topk(k, dim=1).values.sum(dim=1) / flat.sum(dim=1)


def activation_distribution_loss(maps: torch.Tensor, k: int) -> torch.Tensor:
    """L_d (eq. 9-11) per image, [B, h, w] -> [B]: P(c_k) = (1/K) sum_l c_k c_l d_kl over the K candidates
    (the largest values), d_kl the Euclidean distance between their cells in cell units; L_d = max_k P(c_k).
    Only c_k* learns (design 4.6.4: "we optimize only one candidate"): the c_l are detached, so
    dL_d / dc_k* = (1/K) sum_l c_l d_k*l and every other cell gets no gradient."""
    values, index = maps.flatten(1).topk(k, dim=1)
    cells = torch.stack([index // maps.shape[-1], index % maps.shape[-1]], dim=-1).to(values.dtype)
    distances = (cells[:, :, None] - cells[:, None]).norm(dim=-1)
    potentials = values * (distances @ values.detach()[..., None]).squeeze(-1) / k
    return potentials.gather(1, potentials.detach().argmax(dim=1, keepdim=True)).squeeze(1)


def concentration_loss(
    loss: Callable[[torch.Tensor, int], torch.Tensor], maps: torch.Tensor, ratios: Sequence[float]
) -> torch.Tensor:
    """``loss`` on every attention map of ``maps`` [B, N, h, w] with its own K, summed over the N modules and
    averaged over the batch; in fp32."""
    counts = candidate_counts(ratios, maps.shape[-2] * maps.shape[-1])
    return sum(loss(maps[:, i].float(), k) for i, k in enumerate(counts)).mean()


@OBJECTIVE_REGISTRY.register("clpd")
class CLPDObjective(GlobalFirstObjective):
    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        attention, descriptor = model.get("clpd_attention", "multiscale"), model.get("clpd_descriptor", "SPR")
        return f"CLPD ({attention} attention, {descriptor} descriptor)"

    local_terms = LOCAL_TERMS

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.ratios = list(cfg.loss.clpd_candidate_ratios)
        if len(self.ratios) != model.num_parts:
            raise ValueError(
                f"loss.clpd_candidate_ratios has {len(self.ratios)} entries for {model.num_parts} "
                f"attention modules (model.clpd_parts)"
            )
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)
        self.triplet = BatchHardTripletLoss(cfg.loss.triplet_margin)

    def default_weights(self) -> Dict[str, float]:
        loss = self.cfg.loss
        return {
            "loss_global": 1.0,
            "loss_local": 1.0,
            "loss_ratio": loss.clpd_ratio_weight,
            "loss_distribution": loss.clpd_distribution_weight,
            "loss_tri": loss.triplet_weight,
        }

    def terms(self, out, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        compute = {
            "loss_global": lambda: self.id_loss(out.logits[:, :1], targets),
            "loss_local": lambda: self.id_loss(out.logits[:, 1:], targets),
            "loss_ratio": lambda: concentration_loss(activation_ratio_loss, out.aux["attention_maps"], self.ratios),
            "loss_distribution": lambda: concentration_loss(
                activation_distribution_loss, out.aux["attention_maps"], self.ratios
            ),
            "loss_tri": lambda: self.triplet(branch_features(out.feature_maps), targets),
        }
        return {name: compute[name]() for name in active}
