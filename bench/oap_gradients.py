"""Diagnostic: how strongly L_id and alpha * L_oap pull on each part of a CAMA model, on one training batch.

Prints the gradient norm of each loss term on the classifiers, the branches' last stages and the shared
trunk, from a training checkpoint. Used to investigate why CAMA's L_id fell more slowly than MltB+L_id's on
the shortened CPU schedule (see the README's results section).

    python bench/oap_gradients.py runs/cuhk03/cama/last.pt --batches 4
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from training.engine import Trainer
from training.config import TrainConfig, from_dict
from training.data import batch_loader


def grad_norm(params) -> float:
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint with its config")
    parser.add_argument("--batches", type=int, default=4, help="batches to average over")
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = from_dict(TrainConfig, state["config"])
    cfg.model.pretrained = None
    cfg.run.progress = False
    trainer = Trainer(cfg)
    trainer.model.load_state_dict(state["model"])
    model = trainer.model.train()
    groups = {
        "classifiers": [p for b in model.branches for p in b.classifier.parameters()],
        "branch stages": [p for b in model.branches for p in list(b.stage.parameters()) + list(b.bn.parameters())],
        "trunk": list(model.trunk.parameters()),
    }
    objective, weights = trainer.objective, trainer.objective.weights()
    rows = {name: {"L_id": [], "alpha*L_oap": []} for name in groups}
    loader = batch_loader(trainer.dataset, trainer.augment, trainer.sampler, trainer.generator, args.batches, 0, False)
    for images, targets in loader:
        for term, key in (("L_id", "loss_id"), ("alpha*L_oap", "loss_oap")):
            model.zero_grad(set_to_none=True)
            out = model(images)
            (weights[key] * objective.terms(out, targets, {key})[key]).backward()
            for name, params in groups.items():
                rows[name][term].append(grad_norm(params))
    print(f"{'parameters':16s} {'|grad L_id|':>14s} {'|grad a*L_oap|':>16s} {'ratio':>8s}")
    for name, terms in rows.items():
        id_norm, oap_norm = np.mean(terms["L_id"]), np.mean(terms["alpha*L_oap"])
        print(f"{name:16s} {id_norm:14.4f} {oap_norm:16.4f} {oap_norm / max(id_norm, 1e-12):8.2f}")


if __name__ == "__main__":
    main()
