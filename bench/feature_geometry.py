"""Does a branch's descriptor rank better once centred on its gallery? One branch of each checkpoint, each
set's query against its gallery, scored three ways: as served (L2-normalised GAP), centred on the gallery's
mean first, and standardised per dimension (what a BN neck does at inference).

Written for FMN's GRN, which trails IDE+BN on the same schedule: its descriptor is the GAP of ReLU6
activations (every feature >= 0, gallery cosines all high), IDE+BN's the GAP of a BN map. If that geometry
were the cause, centring would close the gap after training.

    python -m bench.feature_geometry $RUNS/fmn/model.pt $RUNS/ide_bn/model.pt \
        --data-root $DATA/cuhk03-detected --data-root $DATA/prid --output \
            bench/results/pool/feature_geometry.json
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import emit
from model_zoo.provenance import provenance
from training.checkpoints import load_trained_model
from training.evaluation import load_test_split, market_ids, market_metrics


@torch.no_grad()
def descriptors(model, images: np.ndarray, branch: int) -> np.ndarray:
    """The branch's GAP descriptor, not normalised, [n, D]."""
    chunks = [
        model(torch.from_numpy(images[s : s + 128])).feature_maps[:, branch].float().mean(dim=(2, 3)).numpy()
        for s in range(0, len(images), 128)
    ]
    return np.concatenate(chunks)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def scored_three_ways(query: np.ndarray, gallery: np.ndarray, ids: dict) -> dict:
    mean, std = gallery.mean(0), gallery.std(0) + 1e-6
    ways = {
        "as_served": (query, gallery),
        "centred": (query - mean, gallery - mean),
        "standardised": ((query - mean) / std, (gallery - mean) / std),
    }
    figures = {
        "smallest_feature": float(min(query.min(), gallery.min())),
        "mean_gallery_cosine": float((unit(gallery) @ unit(gallery).T).mean()),
    }
    for way, (q, g) in ways.items():
        metrics = market_metrics(unit(q) @ unit(g).T, **ids)
        figures[way] = {"rank1": round(100 * metrics["rank1"], 1), "mAP": round(100 * metrics["mAP"], 1)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-root", action="append", type=Path, required=True)
    parser.add_argument("--branch", type=int, default=0, help="which branch (0: the first, FMN's GRN)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results = {**provenance(), "scores": {}}
    for checkpoint in args.checkpoints:
        model, cfg = load_trained_model(checkpoint, "cpu")
        model.eval()
        for root in args.data_root:
            query_images, query, gallery_images, gallery = load_test_split(
                root, cfg.data.height, cfg.data.width, progress=False
            )
            results["scores"][f"{checkpoint.parent.name}/{root.name}"] = scored_three_ways(
                descriptors(model, query_images, args.branch),
                descriptors(model, gallery_images, args.branch),
                market_ids(query, gallery),
            )
    emit(results, args.output)


if __name__ == "__main__":
    main()
