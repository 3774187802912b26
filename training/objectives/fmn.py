"""FMN's objective (Algorithm 1): ``loss_grn``, the GRN's cross-entropy (phase 1); ``loss_lan``, the LAN's
cross-entropy, and ``loss_rank`` x ``loss.rank_weight``, the probability-margin rank loss against the frozen
GRN (phase 2). The phases (``training/configs/fmn.yaml``) switch the terms on and off through
``loss_weights``; while the LAN's terms are off, the LAN is not run at all.

Not in the paper, for the multi-source recipe (``fmn_pool.yaml``): ``loss_tri`` x ``loss.triplet_weight``, the
batch-hard triplet loss on the L2-normalised descriptor of the network being trained (the GRN while the LAN
is not run, else the LAN)."""

from dataclasses import dataclass
from typing import Dict

import torch

from model_zoo.architectures.common import branch_features
from model_zoo.registry import option
from training.losses import BatchHardTripletLoss, IdentificationLoss, ProbabilityMarginRankLoss
from training.objectives.base import GlobalFirstObjective, LOSS_OPTIONS_REGISTRY, OBJECTIVE_REGISTRY


@LOSS_OPTIONS_REGISTRY.register("fmn")
@dataclass
class FMNLossOptions:
    """The ``loss.*`` keys only the fmn objective reads."""

    rank_margin: float = option(
        0.1, "FMN: margin of the rank loss max(0, p_G - p_L + margin) on true-class probabilities"
    )
    rank_weight: float = option(1.0, "FMN: weight of the rank loss")


@OBJECTIVE_REGISTRY.register("fmn")
class FMNObjective(GlobalFirstObjective):
    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        return f"FMN (GRN + LAN, mask at {model.get('mask_layer', 'stem')})"

    local_terms = ("loss_lan", "loss_rank")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)
        self.rank = ProbabilityMarginRankLoss(cfg.loss.rank_margin)
        self.triplet = BatchHardTripletLoss(cfg.loss.triplet_margin)

    def default_weights(self) -> Dict[str, float]:
        return {
            "loss_grn": 1.0,
            "loss_lan": 1.0,
            "loss_rank": self.cfg.loss.rank_weight,
            "loss_tri": self.cfg.loss.triplet_weight,
        }

    def terms(self, out, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        compute = {
            "loss_grn": lambda: self.id_loss(out.logits[:, :1], targets),
            "loss_lan": lambda: self.id_loss(out.logits[:, 1:], targets),
            "loss_rank": lambda: self.rank(out.logits[:, 0], out.logits[:, 1], targets),
            "loss_tri": lambda: self.triplet(
                branch_features(out.feature_maps[:, -1:]), targets
            ),  # the GRN alone, or the LAN
        }
        return {name: compute[name]() for name in active}
