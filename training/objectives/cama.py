"""CAMA's objective (eq. 8 plus the recipe's triplet term): ``loss_id`` (eq. 7, optionally label-smoothed),
``loss_oap`` x alpha (eq. 5-6, symmetric or ordered; only with two or more branches) and ``loss_tri`` x
``triplet_weight`` (batch-hard, on the per-branch L2-normalised features the embedding concatenates)."""

from typing import Dict

import torch

from model_zoo.architectures.common import branch_features
from training.losses import BatchHardTripletLoss, IdentificationLoss, OverlappedActivationPenalty
from training.objectives.base import OBJECTIVE_REGISTRY, Objective


@OBJECTIVE_REGISTRY.register("cama")
class CAMAObjective(Objective):
    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        if model["num_branches"] == 1:
            return "IDE+BN (N=1)"
        if loss["alpha"] == 0:
            return f"MltB+L_id (N={model['num_branches']}, alpha=0)"
        branches, mode = model["num_branches"], loss.get("oap_mode", "symmetric")
        return f"CAMA {mode} (N={branches}, alpha={loss['alpha']:g}, k={loss['k']})"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)
        self.oap = OverlappedActivationPenalty(cfg.loss.k, cfg.loss.oap_mode)
        self.triplet = BatchHardTripletLoss(cfg.loss.triplet_margin)

    def default_weights(self) -> Dict[str, float]:
        weights = {"loss_id": 1.0, "loss_tri": self.cfg.loss.triplet_weight}
        if len(self.model.branches) > 1:
            weights["loss_oap"] = self.cfg.loss.alpha
        return weights

    def terms(self, out, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        compute = {
            "loss_id": lambda: self.id_loss(out.logits, targets),
            "loss_oap": lambda: self.oap(self.model.target_activation_maps(out.feature_maps, targets)),
            "loss_tri": lambda: self.triplet(branch_features(out.feature_maps), targets),
        }
        return {name: compute[name]() for name in active}
