"""Can the training pool improve a strong imported model without fine-tuning its trunk? (not a test)

Fine-tuning OMZ retail-0277 through its rebuilt graph runs at 5.5 images/s on a 2-core CPU with only the
classifier trained (an epoch of the pool would take about an hour, a full fine-tune days), so this tries what
fits: heads trained on the model's frozen embeddings of the pool (and their flips), and score-level ensembles
of two imported models, each scored side by side with the model alone, on CUHK03-val, PRID and GRID (mAP,
single-query Market protocol). The heads' settings are fixed here in advance, not chosen on PRID or GRID:

- ``whiten``: PCA whitening learnt on the pool, shrinkage s x the mean eigenvalue added (s = 0.1, 0.3, 1);
- ``linear``: a 256x256 linear map (identity start) trained with a cosine classifier (scale 16, label
  smoothing 0.1, Adam, weight decay 5e-4) at two rates, scored after 2, 5 and 10 epochs;
- ``ensemble``: each other ``--model``'s embedding concatenated with the first's (equal weight).

Embeddings are computed once per model and kept in ``--cache`` (a folder outside the repo).

    python -m bench.imported_heads --data $DATA --cache $RUNS/imported_heads \\
        --model model_zoo/models/person_reidentification_retail_0277.onnx --model $RUNS/imports/omz0286.onnx \\
        --output bench/results/imported/imported_heads.json
    python -m bench.imported_heads --write-docs bench/results/imported/imported_heads.json   # docs/models.md's table
"""

import argparse
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch
from tqdm import tqdm

from bench.common import DocsTable, emit, generated_marker
from model_zoo.provenance import provenance
from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, open_cpu_session
from model_zoo.files import sha256_of
from training.data.market import decode_records, read_split
from training.evaluation import load_test_split, market_metrics

POOL = ["cuhk03-detected", "peta-train", "conreid-train"]
EVAL_SETS = ["cuhk03-detected", "prid", "grid"]


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embeddings(model: Path, data: Path, cache: Path) -> Dict[str, np.ndarray]:
    """The model's embeddings of the pool (and its flips) and of each evaluation split, with their ids."""
    path = cache / f"{model.stem}.npz"
    if path.exists():
        return dict(np.load(path))
    session, contract = open_cpu_session(model)
    size = (contract.input_height, contract.input_width)

    def embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: images[i : i + 64]})[0]
                for i in tqdm(range(0, len(images), 64), desc=f"embed {model.stem}", leave=False)
            ]
        )

    out = {}
    for root in POOL:
        records, _ = read_split(data / root / "bounding_box_train")
        images, records, _ = decode_records(records, *size, False, "")
        out[f"train_{root}"], out[f"trainflip_{root}"] = embed(images), embed(images[:, :, ::-1].copy())
        out[f"train_{root}_pid"] = np.array([r.pid for r in records])
    for root in EVAL_SETS:
        query_images, query, gallery_images, gallery = load_test_split(data / root, *size, False)
        out[f"{root}_q"], out[f"{root}_g"] = embed(query_images), embed(gallery_images)
        for key, records in (("q", query), ("g", gallery)):
            out[f"{root}_{key}pid"], out[f"{root}_{key}cam"] = (
                np.array([r.pid for r in records]),
                np.array([r.camid for r in records]),
            )
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def scores(cached: Dict[str, np.ndarray], transform: Callable[[np.ndarray], np.ndarray]) -> Dict[str, float]:
    results = {}
    for name in EVAL_SETS:
        query, gallery = normalised(transform(cached[f"{name}_q"])), normalised(transform(cached[f"{name}_g"]))
        figures = market_metrics(
            query @ gallery.T,
            cached[f"{name}_qpid"],
            cached[f"{name}_qcam"],
            cached[f"{name}_gpid"],
            cached[f"{name}_gcam"],
        )
        results[name] = round(100 * figures["mAP"], 1)
    return results


def pool_features(cached: Dict[str, np.ndarray]):
    features = normalised(np.concatenate([cached[f"{k}_{r}"] for k in ("train", "trainflip") for r in POOL])).astype(
        np.float32
    )
    people = np.concatenate([cached[f"train_{r}_pid"] + 100_000 * i for i, r in enumerate(POOL)] * 2)
    return features, np.unique(people, return_inverse=True)[1]


def whitening(features: np.ndarray) -> Dict[str, Dict[str, float]]:
    mean = features.mean(0)
    eigenvalues, vectors = np.linalg.eigh(np.cov((features - mean).T))
    return {
        f"whiten s={shrink}": (
            mean,
            vectors @ np.diag(1 / np.sqrt(eigenvalues + shrink * eigenvalues.mean())) @ vectors.T,
        )
        for shrink in (0.1, 0.3, 1.0)
    }


def linear_heads(features: np.ndarray, people: np.ndarray, rate: float):
    """Yield (epochs, head) after 2, 5 and 10 epochs of a cosine-classifier-trained linear map."""
    torch.manual_seed(0)
    x, y = torch.tensor(features), torch.tensor(people)
    head = torch.nn.Linear(x.shape[1], x.shape[1])
    torch.nn.init.eye_(head.weight)
    torch.nn.init.zeros_(head.bias)
    centres = torch.nn.Parameter(
        torch.nn.functional.normalize(torch.stack([x[y == p].mean(0) for p in range(int(y.max()) + 1)]), dim=1)
    )
    optimiser = torch.optim.Adam([*head.parameters(), centres], lr=rate, weight_decay=5e-4)
    for epoch in range(1, 11):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 256):
            batch = order[start : start + 256]
            logits = (
                16
                * torch.nn.functional.normalize(head(x[batch]), dim=1)
                @ torch.nn.functional.normalize(centres, dim=1).T
            )
            loss = torch.nn.functional.cross_entropy(logits, y[batch], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if epoch in (2, 5, 10):
            yield epoch, head


def heads_table(results: dict) -> str:
    """docs/models.md's table of a result file: mAP per set, and each row's difference to the first model."""
    rows = list(results["mAP"].items())
    base = rows[0][1]
    lines = [
        "| embedding | " + " | ".join(f"{name} mAP (vs first)" for name in EVAL_SETS) + " |",
        "|" + "---|" * (len(EVAL_SETS) + 1),
    ]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.1f} ({row[s] - base[s]:+.1f})" for s in EVAL_SETS) + " |")
    return "\n".join(lines)


DOCS_TABLE = DocsTable(
    Path(__file__).resolve().parents[1] / "docs" / "models.md", generated_marker("imported heads table"), heads_table
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder holding the pool's sets, cuhk03-detected, prid and grid")
    parser.add_argument("--cache", type=Path, help="folder for the embeddings (outside the repo)")
    parser.add_argument("--model", type=Path, action="append", help="the first is improved; others join ensembles")
    parser.add_argument("--output", type=Path)
    DOCS_TABLE.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLE.write(args.write_docs)
    if not (args.data and args.cache and args.model):
        parser.error("--data, --cache and --model are needed to measure")
    cached = [embeddings(m, args.data, args.cache) for m in args.model]
    first = cached[0]
    results = {
        **provenance(),
        "models": {m.name: sha256_of(m) for m in args.model},
        "data": str(args.data.name),
        "mAP": {},
    }
    rows = results["mAP"]
    rows[args.model[0].stem] = scores(first, lambda x: x)
    features, people = pool_features(first)
    for name, (mean, matrix) in whitening(features).items():
        rows[name] = scores(first, lambda x, mean=mean, matrix=matrix: (normalised(x) - mean) @ matrix)
    for rate in (1e-3, 3e-4):
        for epochs, head in linear_heads(features, people, rate):
            with torch.no_grad():
                rows[f"linear lr={rate:g} epochs={epochs}"] = scores(
                    first, lambda x: head(torch.tensor(normalised(x), dtype=torch.float32)).numpy()
                )
    for model, other in zip(args.model[1:], cached[1:]):
        rows[model.stem] = scores(other, lambda x: x)
        rows[f"ensemble {args.model[0].stem} + {model.stem}"] = scores(
            {
                **first,
                **{
                    k: np.concatenate([normalised(first[k]), normalised(other[k])], 1)
                    for k in first
                    if k.endswith(("_q", "_g"))
                },
            },
            lambda x: x,
        )
    for name, row in rows.items():
        print(f"{name:60s} {row}")
    emit(results, args.output)


if __name__ == "__main__":
    main()
