"""PMM's objective and its attentive feature mixing (design: shared/design/paper-family.md, 1.2).

Terms, summed over the three stages (or those of ``loss.pmm_trained_stages``): ``loss_id``, cross-entropy with
label smoothing (``loss.label_smoothing``, 0.1 in the paper) on y_s; ``loss_tri`` x ``loss.triplet_weight``,
batch-hard triplet (soft margin in the paper: ``loss.triplet_margin: null``) on the raw vectors u_s.

The training forward hands the model an ``AttentiveMix``: for stage s+1 it takes stage s's detached Grad-CAM
(the batch sum of each image's target-class logit, with respect to that stage's input; parameter gradients
untouched), sums it over blocks of ``loss.mix_block`` cells, and replaces the ``loss.mix_top_blocks`` highest
blocks of x_p (A-Hard-Mix, eq. 2) with the same blocks of another person's x_p, drawn per anchor and again
per stage. Stage III mixes the fresh x_p, not stage II's input (the authors' code). ``loss.mix: cutout`` zeroes
the blocks instead (Table 3's CutOut); ``none`` trains without mixing.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from model_zoo.registry import option
from training.gradcam import grad_cam
from training.losses import BatchHardTripletLoss, IdentificationLoss
from training.objectives.base import LOSS_OPTIONS_REGISTRY, OBJECTIVE_REGISTRY, Objective

MIXES = ("hardmix", "cutout", "none")


@LOSS_OPTIONS_REGISTRY.register("pmm")
@dataclass
class PMMLossOptions:
    """The ``loss.*`` keys only the pmm objective reads."""

    mix: str = option(
        "hardmix",
        "PMM: what stages II and III see in training: 'hardmix' (A-Hard-Mix: Grad-CAM's top "
        "blocks from another person), 'cutout' (those blocks zeroed) or 'none'",
    )
    mix_block: List[int] = option(
        [1, 1], "PMM: the Grad-CAM block, [rows, columns] of feature-map cells (the paper: 3x2 on a 24x8 map)"
    )
    mix_top_blocks: int = option(
        8, "PMM: K, how many of the highest-ranked blocks are mixed (the paper: 3 Market, 6 Duke, 8 CUHK03)"
    )
    pmm_trained_stages: List[int] = option(
        [1, 2, 3],
        "PMM: the stages (1-3) whose identity and triplet terms train; "
        "the others still run and are evaluated, get no gradient, and "
        "only weight decay moves them. [1]: the shared backbone learns "
        "from stage I alone (a diagnostic, not the paper)",
    )


def top_block_mask(cam: torch.Tensor, block: Sequence[int], k: int) -> torch.Tensor:
    """[B, 1, h, w]: 0 on the ``k`` blocks (``block`` = rows x columns of cells) with the largest sums of ``cam``
    [B, h, w], 1 elsewhere (eq. 1). Ties go to the lowest block index (row-major)."""
    batch, height, width = cam.shape
    rows, cols = block
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} map does not split into {rows}x{cols} blocks")
    sums = cam.reshape(batch, height // rows, rows, width // cols, cols).sum(dim=(2, 4)).flatten(1)
    if not 0 <= k <= sums.shape[1]:
        raise ValueError(f"k={k}: the map has {sums.shape[1]} blocks")
    top = torch.argsort(-sums, dim=1, stable=True)[:, :k]
    keep = torch.ones_like(sums).scatter_(1, top, 0.0).view(batch, height // rows, width // cols)
    return keep.repeat_interleave(rows, dim=1).repeat_interleave(cols, dim=2).unsqueeze(1)


def pick_negatives(targets: torch.Tensor) -> torch.Tensor:
    """For each image, the index of a random image of another person in the batch."""
    others = (targets.view(-1, 1) != targets.view(1, -1)).float()
    if not others.any(dim=1).all():
        raise ValueError("attentive mixing needs at least two people in every batch")
    return torch.multinomial(others, 1).squeeze(1)


def hard_mix(anchor: torch.Tensor, negative: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: m * f_a + (1 - m) * f_n, the mask broadcast over channels; gradients reach both."""
    return mask * anchor + (1 - mask) * negative


class AttentiveMix:
    """The ``mix`` callable PMM's forward takes: (stage input, stage logits, x_p) -> the next stage's input."""

    def __init__(self, targets: torch.Tensor, block: Sequence[int], k: int, mode: str = "hardmix"):
        if mode not in MIXES[:2]:
            raise ValueError(f"unknown mix {mode!r}; one of {', '.join(MIXES)}")
        self.targets, self.block, self.k, self.mode = targets, tuple(block), k, mode

    def __call__(self, stage_input: torch.Tensor, logits: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        score = logits.gather(1, self.targets.view(-1, 1)).sum()
        mask = top_block_mask(grad_cam(score, stage_input, "detached"), self.block, self.k).to(part.dtype)
        if self.mode == "cutout":
            return part * mask
        return hard_mix(part, part[pick_negatives(self.targets)], mask)


@OBJECTIVE_REGISTRY.register("pmm")
class PMMObjective(Objective):
    @staticmethod
    def row_name(model: Dict, loss: Dict) -> str:
        mix = loss.get("mix", "hardmix")
        return f"PMM ({'A-Hard-Mix' if mix == 'hardmix' else mix}, K={loss.get('mix_top_blocks')})"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if cfg.loss.mix not in MIXES:
            raise ValueError(f"unknown loss.mix {cfg.loss.mix!r}; one of {', '.join(MIXES)}")
        stages = cfg.loss.pmm_trained_stages
        if not stages or len(set(stages)) != len(stages) or not set(stages) <= {1, 2, 3}:
            raise ValueError(f"loss.pmm_trained_stages {stages!r}: distinct stages among 1, 2, 3, at least one")
        self.trained = [stage - 1 for stage in sorted(stages)]
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)
        self.triplet = BatchHardTripletLoss(cfg.loss.triplet_margin)

    def default_weights(self) -> Dict[str, float]:
        return {"loss_id": 1.0, "loss_tri": self.cfg.loss.triplet_weight}

    def forward(self, images, targets):
        loss = self.cfg.loss
        mix = None if loss.mix == "none" else AttentiveMix(targets, loss.mix_block, loss.mix_top_blocks, loss.mix)
        return self.model(images, mix)

    def terms(self, out, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        compute = {
            "loss_id": lambda: self.id_loss(out.logits[:, self.trained], targets),
            "loss_tri": lambda: self.triplet(out.aux["vectors"][:, self.trained], targets),
        }
        return {name: compute[name]() for name in active}
