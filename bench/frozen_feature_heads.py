"""Which classifier heads learn the pool's people from fixed features? The classifier warm-up without its cost.

Written for PMM, whose classifiers stay at chance through the warm-up epoch where IDE+BN's reach 4%
(docs/results.md, PMM). One pass of the ImageNet MobileNetV2 (IBN-a, last stride 1, eval mode, no augmentation) over
the whole pool caches its last-stage maps x; then each head, built from the architectures' own modules,
learns on those fixed maps as a warm-up does (only the classifier learns; the head's batch norms use batch
statistics): the same PxK batches for every head, Adam with the recipe's weight decay, label smoothing 0.1,
the rate rising linearly from ``warmup_lr`` to ``lr`` over the warm-up's batches, then held at ``lr``.

Heads: ``ide_bn`` (CAMA's branch with N = 1: BN over the map, GAP, bias-free classifier from N(0, 0.001));
``ide_bn_relu`` (the same with a ReLU on the GAP, so the classifier sees features >= 0); ``fmn_grn`` (FMN's
GRN head: GAP of the ReLU6 map, biased classifier with PyTorch's default start; features >= 0 too); ``pmm``
(PMM's stage I: GAP, 1x1 conv, BN, ReLU, Kaiming-started biased classifier); ``pmm_no_relu`` (the same stage
without its ReLU); ``pmm_small_init`` (its classifier from N(0, 0.001)), and with that start also without the ReLU
(``pmm_small_init_no_relu``) or with a batch norm between u and the classifier (``pmm_small_init_bn_neck``).
Training accuracy and cross-entropy are each batch's before its step, as the trainer logs them.

Fixed, unaugmented features are easier than a warm-up's (augmented images, the backbone's batch norms on batch
statistics), so the figures compare heads with each other, not with the training runs' accuracies.

    python -m bench.frozen_feature_heads --data $DATA --output bench/results/pool/frozen_feature_heads.json
"""

import itertools
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bench.common import emit
from bench.pool_runs import pool_bench_parser, row_trainer
from model_zoo.provenance import provenance
from model_zoo.architectures.cama import CAMABranch
from model_zoo.architectures.pmm import GlobalStage

# a head: (the module holding every layer, its classifier, fixed maps [B, C, h, w] -> logits)
Head = Tuple[nn.Module, nn.Linear, Callable[[torch.Tensor], torch.Tensor]]


def ide_head(channels: int, classes: int, relu: bool) -> Head:
    branch = CAMABranch(nn.Identity(), channels, classes, None)
    pool = (lambda x: torch.relu(x.mean(dim=(2, 3)))) if relu else (lambda x: x.mean(dim=(2, 3)))
    return branch, branch.classifier, lambda x: branch.classifier(pool(branch(x)))


def pmm_head(channels: int, classes: int, small_init: bool, neck: str) -> Head:
    """PMM's stage I; ``neck``: ``relu`` (the paper's u), ``none`` (no ReLU) or ``bn`` (a batch norm after u)."""
    stage = GlobalStage(channels, 512, classes)
    if small_init:
        nn.init.normal_(stage.classifier.weight, std=0.001)
    if neck == "none":
        return (
            stage,
            stage.classifier,
            lambda x: stage.classifier(stage.bn(stage.conv(x.mean(dim=(2, 3), keepdim=True))).flatten(1)),
        )
    if neck == "bn":
        bn = nn.BatchNorm1d(512)
        return nn.ModuleList([stage, bn]), stage.classifier, lambda x: stage.classifier(bn(stage(x)[0]))
    return stage, stage.classifier, lambda x: stage(x)[1]


def fmn_grn_head(channels: int, classes: int) -> Head:
    """FMN's GRN head: GAP of the backbone's ReLU6 output into a biased classifier (PyTorch's default start)."""
    classifier = nn.Linear(channels, classes)
    return classifier, classifier, lambda x: classifier(x.mean(dim=(2, 3)))


HEADS: Dict[str, Callable[[int, int], Head]] = {
    "ide_bn": lambda c, n: ide_head(c, n, relu=False),
    "ide_bn_relu": lambda c, n: ide_head(c, n, relu=True),
    "fmn_grn": fmn_grn_head,
    "pmm": lambda c, n: pmm_head(c, n, small_init=False, neck="relu"),
    "pmm_no_relu": lambda c, n: pmm_head(c, n, small_init=False, neck="none"),
    "pmm_small_init": lambda c, n: pmm_head(c, n, small_init=True, neck="relu"),
    "pmm_small_init_no_relu": lambda c, n: pmm_head(c, n, small_init=True, neck="none"),
    "pmm_small_init_bn_neck": lambda c, n: pmm_head(c, n, small_init=True, neck="bn"),
}


@torch.no_grad()
def cache_maps(backbone: nn.Module, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """The backbone's last-stage maps of every image, float16 [N, C, h, w]."""
    backbone.eval()
    chunks = [
        backbone(torch.from_numpy(images[start : start + batch_size])).half()
        for start in tqdm(range(0, len(images), batch_size), desc="cache maps", leave=False)
    ]
    return torch.cat(chunks)


def learn(
    head: Head,
    maps: torch.Tensor,
    labels: torch.Tensor,
    batches: List[List[int]],
    warmup: int,
    lr: float,
    warmup_lr: float,
    weight_decay: float,
    report_every: int,
) -> List[dict]:
    """Train the head's classifier alone on the batches; the mean cross-entropy and accuracy every ``report_every``."""
    module, classifier, logits_of = head
    module.train().requires_grad_(False)
    classifier.requires_grad_(True)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=warmup_lr, weight_decay=weight_decay)
    curve, window = [], []
    for step, indices in enumerate(tqdm(batches, desc="learn", leave=False)):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr + (lr - warmup_lr) * min(1.0, step / max(1, warmup - 1))
        logits, targets = logits_of(maps[indices].float()), labels[indices]
        loss = F.cross_entropy(logits, targets, label_smoothing=0.1)
        window.append((loss.item(), (logits.argmax(1) == targets).float().mean().item()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % report_every == 0:
            ce, acc = np.mean(window, axis=0)
            curve.append({"batches": step + 1, "cross_entropy": round(float(ce), 3), "accuracy": round(float(acc), 4)})
            window = []
    return curve


def main() -> None:
    parser = pool_bench_parser(__doc__, Path("/tmp/frozen_feature_heads"))
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=list(HEADS))
    parser.add_argument(
        "--epochs", type=int, default=3, help="passes of the sampler's batches; the first is the warm-up"
    )
    parser.add_argument("--report-every", type=int, default=58)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trainer = row_trainer("ide_bn", args.data.resolve(), args.scratch)
    model, solver = trainer.model, trainer.cfg.solver
    backbone = nn.Sequential(model.normalize, model.trunk, model.branches[0].stage)
    maps = cache_maps(backbone, np.stack([trainer.dataset.image(i) for i in range(len(trainer.dataset))]))
    labels = torch.from_numpy(trainer.dataset.labels).long()
    warmup = len(trainer.sampler)
    batches = list(
        itertools.islice(
            itertools.chain.from_iterable(trainer.sampler for _ in range(args.epochs)), warmup * args.epochs
        )
    )
    results = {
        **provenance(),
        "images": len(labels),
        "people": int(labels.max()) + 1,
        "map": list(maps.shape[1:]),
        "batch": len(batches[0]),
        "warmup_batches": warmup,
        "batches": len(batches),
        "lr": solver.lr,
        "warmup_lr": solver.warmup_lr,
        "weight_decay": solver.weight_decay,
        "heads": {},
    }
    for name in args.heads:
        torch.manual_seed(0)
        head = HEADS[name](maps.shape[1], results["people"])
        results["heads"][name] = learn(
            head, maps, labels, batches, warmup, solver.lr, solver.warmup_lr, solver.weight_decay, args.report_every
        )
        print(name, results["heads"][name][-1], file=sys.stderr, flush=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
