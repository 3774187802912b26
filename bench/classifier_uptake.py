"""How fast does each row's classifier warm-up take hold? One fixed batch of real training images, the row's
first phase (the classifier warm-up: only the classifiers learn) at the recipe's peak rate, a few steps; each
branch's cross-entropy (no label smoothing) and accuracy on that batch, and the spread of its first logits.

Written for PMM, whose warm-up epoch ended at chance accuracy where IDE+BN's reached 4%: a classifier that
cannot fit one batch in a few steps cannot learn 1,462 people in 290 batches (the converse does not hold:
docs/results.md, PMM). Step counts, not time, so a busy CPU does not change the figures; the same seed gives the same
batch and initial weights to every row.

    python -m bench.classifier_uptake --data $DATA --rows ide_bn cama_ordered pmm pmm_small_init fmn casn \
        clpd \
        --output bench/results/pool/classifier_uptake.json
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import emit
from bench.pool_runs import ROWS, pool_bench_parser, row_trainer
from model_zoo.provenance import provenance
from training.data.loader import batch_loader
from training.engine import Trainer
from training.solver import set_learning_rate


def branch_figures(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per branch: cross-entropy and accuracy on the batch; logits [B, N, C]."""
    logits = logits.detach().float()
    return {
        f"branch{i + 1}": {
            "cross_entropy": round(F.cross_entropy(logits[:, i], targets).item(), 3),
            "accuracy": round((logits[:, i].argmax(-1) == targets).float().mean().item(), 3),
        }
        for i in range(logits.shape[1])
    }


def uptake(trainer: Trainer, steps: int, report_every: int) -> dict:
    trainer.enter_phase(0)
    phase = trainer.schedule.phases[0]
    images, targets = next(iter(batch_loader(trainer.dataset, trainer.augment, trainer.sampler, trainer.generator, 1)))
    curve = []
    for step in range(steps + 1):
        set_learning_rate(trainer.optimizer, trainer.cfg.solver.lr)
        out, loss, _ = trainer.objective(images, targets)
        if step == 0:
            first_spread = out.logits.detach().float().std(dim=-1).mean(dim=0).tolist()
        if step % report_every == 0:
            curve.append({"step": step, **branch_figures(out.logits, targets)})
        if step < steps:
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
    return {
        "phase": phase.name,
        "trainable": phase.trainable,
        "lr": trainer.cfg.solver.lr,
        "classes": trainer.dataset.num_classes,
        "first_logit_std_per_branch": [round(s, 3) for s in first_spread],
        "curve": curve,
    }


def main() -> None:
    parser = pool_bench_parser(__doc__, Path("/tmp/classifier_uptake"))
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=sorted(ROWS),
        default=["ide_bn", "cama_ordered", "pmm", "pmm_small_init", "fmn", "casn", "clpd"],
    )
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--report-every", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        **provenance(),
        "batch": "one PxK batch of the pool (seed 0), the same for every row",
        "steps": args.steps,
        "rows": {},
    }
    for name in args.rows:
        results["rows"][name] = uptake(
            row_trainer(name, args.data.resolve(), args.scratch), args.steps, args.report_every
        )
        print(name, results["rows"][name]["curve"][-1], file=sys.stderr, flush=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
