"""Diagnostic: how strongly each loss term pulls on each part of a model, on a few training batches.

From a training checkpoint of any architecture: the norm of each weighted term's gradient (L_id, alpha * L_oap,
the triplet term, ...) on each of the architecture's parameter groups, its shared trunk, the rest and all
parameters, one training forward per batch (the architecture's own: PMM's mixing included), averaged over the
batches. Used
for CAMA's slow L_id on the CUHK03 schedule and for PMM's stalled main phase (docs/results.md, Results).

    python -m bench.loss_gradients $RUNS/pmm/last.pt --batches 4 --output bench/results/pool/pmm_loss_gradients.json
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from bench.common import emit
from model_zoo.provenance import portable_path, provenance
from training.config import TrainConfig, from_dict
from training.data import batch_loader
from training.engine import Trainer


def grad_norm(params) -> float:
    return float(torch.sqrt(sum(((p.grad.float() ** 2).sum() for p in params if p.grad is not None), torch.zeros(()))))


def parameter_parts(model: torch.nn.Module) -> Dict[str, List[torch.nn.Parameter]]:
    """The architecture's own parameter groups (classifiers, ...; they may overlap), its shared trunk where it
    has one, the rest (neither classifiers nor trunk: CAMA's branch stages) and all parameters."""
    parts = {
        name: [p for module in modules for p in module.parameters()]
        for name, modules in model.parameter_groups().items()
    }
    parts["trunk"] = list(model.trunk.parameters()) if hasattr(model, "trunk") else []
    taken = {id(p) for p in parts["classifiers"] + parts["trunk"]}
    return {**parts, "rest": [p for p in model.parameters() if id(p) not in taken], "all": list(model.parameters())}


def term_gradients(trainer: Trainer, batches: int) -> Dict[str, Dict[str, float]]:
    """{term: {part: mean gradient norm}} of every weighted term, the model in its last phase's training mode."""
    trainer.enter_phase(len(trainer.schedule.phases) - 1)
    objective, weights = trainer.objective, trainer.objective.weights()
    active = sorted(name for name, weight in weights.items() if weight)
    parts = parameter_parts(trainer.model)
    norms = {term: {part: [] for part in parts} for term in active}
    for images, targets in batch_loader(trainer.dataset, trainer.augment, trainer.sampler, trainer.generator, batches):
        out = objective.forward(images, targets)
        terms = objective.terms(out, targets, set(active))
        for term in active:
            trainer.model.zero_grad(set_to_none=True)
            (weights[term] * terms[term]).backward(retain_graph=True)
            for part, params in parts.items():
                norms[term][part].append(grad_norm(params))
    return {
        term: {part: round(float(np.mean(values)), 5) for part, values in by_part.items()}
        for term, by_part in norms.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", type=Path, help="a training checkpoint with its config (RUN/last.pt or RUN/model.pt)"
    )
    parser.add_argument("--batches", type=int, default=4, help="batches to average over")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = from_dict(TrainConfig, state["config"])
    cfg.model.pretrained, cfg.run.progress = None, False
    trainer = Trainer(cfg)
    trainer.model.load_state_dict(state["model"])
    gradients = term_gradients(trainer, args.batches)
    for term, by_part in gradients.items():
        print(f"{term:16s}", "  ".join(f"{part} {norm:9.4f}" for part, norm in by_part.items()), file=sys.stderr)
    emit(
        {
            **provenance(),
            "checkpoint": portable_path(str(args.checkpoint)),
            "epoch": state["epoch"] + 1,
            "batches": args.batches,
            "gradient_norms": gradients,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
