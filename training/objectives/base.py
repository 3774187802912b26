"""The objective interface and its registry."""

from typing import Dict, Tuple

import torch
from torch import nn

from model_zoo.architectures import ReIDOutput
from model_zoo.registry import Registry

OBJECTIVE_REGISTRY = Registry("objective")
# An objective's own ``loss.*`` config keys: a dataclass of ``model_zoo.registry.option`` fields, registered under
# the objective's name next to its code; the training config offers every registered class's keys.
LOSS_OPTIONS_REGISTRY = Registry("loss options")


class Objective:
    """Subclasses name their terms and default weights (``default_weights``) and compute the active ones
    (``terms``); ``forward`` is the training forward, by default ``model(images)``."""

    def __init__(self, cfg, model: nn.Module):
        self.cfg, self.model = cfg, model
        self.overrides: Dict[str, float] = {}

    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        """How a results table names a run of this objective, from its config's model and loss sections (dicts,
        as a run's metrics.json holds them; keys added later may be missing)."""
        return str(model.get("architecture"))

    def default_weights(self) -> Dict[str, float]:
        raise NotImplementedError

    def terms(self, out: ReIDOutput, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        """The value of every term named in ``active``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> ReIDOutput:
        return self.model(images)

    def set_phase_weights(self, overrides: Dict[str, float]) -> None:
        unknown = set(overrides) - set(self.default_weights())
        if unknown:
            raise ValueError(
                f"loss_weights names {sorted(unknown)}; this objective's terms are {sorted(self.default_weights())}"
            )
        self.overrides = dict(overrides)

    def weights(self) -> Dict[str, float]:
        return {**self.default_weights(), **self.overrides}

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> Tuple[ReIDOutput, torch.Tensor, Dict[str, torch.Tensor]]:
        """(output, weighted total, every active term)."""
        out = self.forward(images, targets)
        weights = self.weights()
        active = {name for name, weight in weights.items() if weight}
        terms = self.terms(out, targets, active)
        total = sum(
            (weights[name] * terms[name] for name in sorted(active)),
            out.feature_maps.new_zeros((), dtype=torch.float32),
        )
        return out, total, terms


class GlobalFirstObjective(Objective):
    """For architectures whose global network first trains alone (FMN's GRN, CLPD's global branch): while no
    term of ``local_terms`` is weighted, the forward runs only ``model.global_output``."""

    local_terms: Tuple[str, ...] = ()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> ReIDOutput:
        weights = self.weights()
        if not any(weights[name] for name in self.local_terms):
            return self.model.global_output(images)
        return self.model(images)


def build_objective(cfg, model: nn.Module) -> Objective:
    """The objective ``loss.objective`` names, by default the architecture's own; with ``loss.teacher``, wrapped
    in distillation from that model (``training.objectives.distillation``)."""
    objective = OBJECTIVE_REGISTRY.get(cfg.loss.objective or cfg.model.architecture)(cfg, model)
    if not cfg.loss.teacher:
        return objective
    from training.objectives.distillation import Distilled, OnnxTeacher

    teacher = OnnxTeacher(cfg.loss.teacher, (cfg.data.height, cfg.data.width), cfg.run.threads or 0)
    return Distilled(objective, teacher, cfg.loss.kd_feature_weight, cfg.loss.kd_relation_weight)
