"""Can a same-person threshold be estimated for new cameras without labels? (not a test; the answer was no, so
``training adapt`` does not write one.)

The idea: among pairs of crops from different cameras nearly all show two different people, so the score those
pairs exceed at the target false-match rate (FMR) should land near the threshold a labelled calibration finds
(``training.calibration``). Measured on CUHK03-val, PRID and GRID (every query and gallery crop, labels used only
to score the estimate), with retail-0277 and with it adapted by ``training adapt``'s defaults; target FMR 1e-3.
Reads the pooled maps bench/adaptation.py keeps in ``--cache``.

    python -m bench.threshold_estimate --cache $RUNS/adaptation \
        --output bench/results/adaptation/threshold_estimate.json
    python -m bench.threshold_estimate --write-docs bench/results/adaptation/threshold_estimate.json
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import DocsTable, emit, generated_marker
from model_zoo.provenance import provenance
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.files import sha256_of
from training.adaptation.head import BranchLinearHead
from training.adaptation.loop import AdaptationSettings, adapt_head, embed
from training.calibration import pair_scores, rates, threshold_at

SETS = ["cuhk03-detected", "prid", "grid"]
TARGET_FMR = 1e-3
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def cross_camera_scores(features: np.ndarray, cameras: np.ndarray) -> np.ndarray:
    rows, cols = np.triu_indices(len(features), k=1)
    different = cameras[rows] != cameras[cols]
    return np.einsum("ij,ij->i", features[rows[different]], features[cols[different]])


def compare(features: np.ndarray, pids: np.ndarray, cameras: np.ndarray) -> dict:
    """The estimated and the labelled threshold, and the true rates each gives."""
    estimated = threshold_at(cross_camera_scores(features, cameras), TARGET_FMR)
    genuine, impostor = pair_scores(features, pids, cameras, 1)
    labelled = threshold_at(impostor, TARGET_FMR)
    keep = ("fmr", "tmr")
    return {
        "estimated": {
            "threshold": estimated,
            **{k: v for k, v in rates(genuine, impostor, estimated).items() if k in keep},
        },
        "labelled": {
            "threshold": labelled,
            **{k: v for k, v in rates(genuine, impostor, labelled).items() if k in keep},
        },
    }


def run(model: Path, cache: Path) -> dict:
    torch.set_num_threads(2)
    results = {"model": model.name, "model_sha256": sha256_of(model), "target_fmr": TARGET_FMR, "sets": {}}
    for name in SETS:
        cached = dict(np.load(cache / f"{model.stem}_{name}.npz"))
        cameras = np.unique(cached["cams"], return_inverse=True)[1]
        adapted, _ = adapt_head(cached["views"], cameras, AdaptationSettings(), progress=False)
        results["sets"][name] = {
            label: compare(embed(head, cached["views"][:, 0]), cached["pids"], cached["cams"])
            for label, head in (("source", BranchLinearHead(*cached["views"].shape[2:])), ("adapted", adapted))
        }
    return results


def table(results: dict) -> str:
    lines = [
        "| set | model | threshold: estimated / labelled | true FMR at the estimate (target 0.001) "
        "| TMR: at the estimate / labelled |",
        "|---|---|---|---|---|",
    ]
    for name, models in results["sets"].items():
        for label, row in models.items():
            e, t = row["estimated"], row["labelled"]
            lines.append(
                f"| {name} | {label} | {e['threshold']:.3f} / {t['threshold']:.3f} | {e['fmr']:.4f} | "
                f"{e['tmr']:.3f} / {t['tmr']:.3f} |"
            )
    return "\n".join(lines)


DOCS_TABLE = DocsTable(DOCS, generated_marker("threshold estimate table"), table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="bench/adaptation.py's --cache folder")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--output", type=Path, default=None)
    DOCS_TABLE.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        DOCS_TABLE.write(args.write_docs)
        return
    if args.cache is None:
        parser.error("--cache is required to measure")
    results = {**provenance(), **run(args.model, args.cache)}
    emit(results, args.output)


if __name__ == "__main__":
    main()
