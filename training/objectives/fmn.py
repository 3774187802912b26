"""FMN's objective (Algorithm 1): ``loss_grn``, the GRN's cross-entropy (phase 1); ``loss_lan``, the LAN's
cross-entropy, and ``loss_rank`` x ``loss.rank_weight``, the probability-margin rank loss against the frozen
GRN (phase 2). The phases (``training/configs/fmn.yaml``) switch the terms on and off through
``loss_weights``; while the LAN's terms are off, the LAN is not run at all.

Not in the paper, for the multi-source recipe (``fmn_pool.yaml``): ``loss_tri`` x ``loss.triplet_weight``, the
batch-hard triplet loss on the L2-normalised descriptor of the network being trained (the GRN while the LAN
is not run, else the LAN)."""

from typing import Dict

import torch

from model_zoo.architectures.common import branch_features
from training.losses import BatchHardTripletLoss, IdentificationLoss, ProbabilityMarginRankLoss
from training.objectives.base import OBJECTIVE_REGISTRY, GlobalFirstObjective


@OBJECTIVE_REGISTRY.register("fmn")
class FMNObjective(GlobalFirstObjective):
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
