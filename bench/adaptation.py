"""Unsupervised adaptation (``python -m training adapt``) measured where labels exist (not a test).

For each of CUHK03-val, PRID and GRID, the crops a deployment would hold (the set's query and gallery crops,
labels unread) and two protocols:

- ``transductive``: adapt on every crop of the set, evaluate on the set;
- ``inductive``: adapt on the crops of half the people (every other id in sorted order), evaluate on the other
  half's queries against the other half's gallery, the source model scored on the same half.

Every variant is fixed here in advance: the four pairings of a clusterer (DBSCAN on the Jaccard distance, as
Cluster Contrast; cross-camera mutual neighbours) and a memory (cluster centroids; camera-aware proxies, as
CAP), each at two rates (Adam 1e-4, 3e-4), two lengths (20, 100 steps an epoch) and with or without the pull
back to the source (anchor weight 0, 1), 10 epochs. The default ``training adapt`` ships with is the variant
with the largest mean mAP change over CUHK03-val's two protocols (a deployment's gallery keeps meeting new
people, so the inductive figure counts as much as the transductive one), never chosen on PRID or GRID. Each
crop's pooled maps are computed once per set (timed: the embedding's CPU cost) and kept in ``--cache`` (a
folder outside the repo).

    python -m bench.adaptation --data $DATA --cache $RUNS/adaptation \\
        --output bench/results/adaptation/adaptation.json
    python -m bench.adaptation --write-docs bench/results/adaptation/adaptation.json   # docs/training.md's table

``--checkpoint MODEL.pt`` measures the other kind, a training checkpoint's whole network adapted
(``training.adaptation.trunk``), in the variants of ``NETWORK_PAIRINGS`` (fixed here beforehand: the head's
default pairing, and CAP's memory, at the fine-tune rate of ``omz_finetune.yaml``'s main phase, 4 epochs of 20
batches: what two CPU cores run in minutes per set; ``NETWORK_VARIANTS`` adds CAP's with OAP for a CAMA network),
from the checkpoint's own evaluation of each set:

    python -m bench.adaptation --data $DATA --checkpoint $RUNS/omz0288_ft/model.pt \\
        --output bench/results/adaptation/adaptation_network.json

``--statistics`` measures what needs no training beside it (``STATISTICS``): the model's features less the
mean of the crops adapted on, of all of them or of each camera's, from the same cached maps:

    python -m bench.adaptation --statistics --data $DATA --cache $RUNS/adaptation \\
        --output bench/results/adaptation/camera_statistics.json

An OpenVINO IR is a checkpoint too (the default's ships beside it). ``--sets``, ``--protocols`` and ``--variants``
measure a slice, where a network is too slow for the whole on a CPU; the file records which.
"""

import argparse
import itertools
import os
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from bench.common import DocsTables, emit
from bench.printed_tables import CENTRED
from model_zoo.provenance import data_fingerprint, provenance
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.contract import open_cpu_session
from model_zoo.files import sha256_of
from training.adaptation import overlap_penalty
from training.adaptation.head import BranchLinearHead
from training.adaptation.loop import CAMERA_FREE, AdaptationSettings, adapt_features, adapt_head, embed
from training.adaptation.trunk import TrunkAdaptee
from training.checkpoints import load_trained_model
from training.data.transforms import TrainAugmentation
from training.adaptation.views import pooled_views
from training.evaluation import branch_features, load_test_split, market_metrics

SETS = ["cuhk03-detected", "prid", "grid"]
PROTOCOLS = ["transductive", "inductive"]
SELECTION_SET = "cuhk03-detected"
SELECTION = f"the mean mAP change over {SELECTION_SET}'s transductive and inductive protocols"
VARIANTS = {
    f"{clusterer}+{memory} lr {lr:g} steps {steps} anchor {anchor:g}": dict(
        clusterer=clusterer, memory=memory, lr=lr, steps_per_epoch=steps, anchor_weight=anchor, epochs=10
    )
    for clusterer, memory, lr, steps, anchor in itertools.product(
        ("dbscan", "mutual"), ("cluster", "camera"), (1e-4, 3e-4), (20, 100), (0.0, 1.0)
    )
}
NETWORK_VARIANTS = {
    f"network {clusterer}+{memory} lr 3.5e-05 steps 20": dict(
        clusterer=clusterer, memory=memory, lr=3.5e-5, steps_per_epoch=20, epochs=4
    )
    for clusterer, memory in (("mutual", "cluster"), ("mutual", "camera"))
}
NETWORK_PAIRINGS = tuple(NETWORK_VARIANTS)  # what --checkpoint measures by default: any network
# CAP's variant with CAMA's OAP at the training recipe's weight (alpha = 1): for networks of several branches.
NETWORK_VARIANTS["network mutual+camera lr 3.5e-05 steps 20 oap 1"] = dict(
    clusterer="mutual", memory="camera", lr=3.5e-5, steps_per_epoch=20, epochs=4, oap_weight=1.0
)
# Label-free feature statistics instead of adaptation (``--statistics``): each crop's feature less the mean of
# the crops adapted on (all of them, or its camera's), optionally divided by their sd, per dimension.
STATISTICS = {
    "global centring": dict(per_camera=False, standardise=False),
    "camera centring": dict(per_camera=True, standardise=False),
    "camera standardising": dict(per_camera=True, standardise=True),
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def set_views(model: Path, data: Path, name: str, cache: Path) -> Dict[str, np.ndarray]:
    """The set's crops as pooled views, with ids, cameras, the query count and the seconds embedding took."""
    path = cache / f"{model.stem}_{name}.npz"
    if path.exists():
        return dict(np.load(path))
    session, contract = open_cpu_session(model)
    query_images, query, gallery_images, gallery = load_test_split(
        data / name, contract.input_height, contract.input_width, False
    )
    pixels = np.concatenate([query_images, gallery_images])
    started = time.perf_counter()
    views = pooled_views(session, pixels, progress=False)
    out = {
        "views": views,
        "pids": np.array([r.pid for r in query + gallery]),
        "cams": np.array([r.camid for r in query + gallery]),
        "is_query": np.arange(len(pixels)) < len(query),
        "embed_seconds": np.array(time.perf_counter() - started),
    }
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def figures(head: BranchLinearHead, cached: Dict[str, np.ndarray], kept: np.ndarray) -> Dict[str, float]:
    """R1 and mAP (%) of the kept crops' queries against the kept crops' gallery, the image view only."""
    return scores(embed(head, cached["views"][:, 0]), cached, kept)


def scores(features: np.ndarray, cached: Dict[str, np.ndarray], kept: np.ndarray) -> Dict[str, float]:
    """R1 and mAP (%) of the kept crops' queries against the kept crops' gallery, from their ``features``."""
    q, g = kept & cached["is_query"], kept & ~cached["is_query"]
    m = market_metrics(
        features[q] @ features[g].T, cached["pids"][q], cached["cams"][q], cached["pids"][g], cached["cams"][g]
    )
    return {"rank1": round(100 * m["rank1"], 1), "mAP": round(100 * m["mAP"], 1)}


def variant_row(figures: Dict[str, float], history, seconds: float, adapted_on: np.ndarray) -> dict:
    """A variant's figures, its last epoch's clusters and outliers, and its CPU minutes per 1,000 crops."""
    return {
        **figures,
        "clusters": history[-1].clusters,
        "outliers": history[-1].outliers,
        "adapt_cpu_minutes_per_1000": round(seconds / 60 / float(adapted_on.sum()) * 1000, 2),
    }


def protocol_crops(cached: Dict[str, np.ndarray], protocol: str):
    """(crops adapted on, crops evaluated on) as masks."""
    everything = np.ones(len(cached["pids"]), bool)
    if protocol == "transductive":
        return everything, everything
    people = np.unique(cached["pids"])
    second_half = np.isin(cached["pids"], people[1::2])
    return ~second_half, second_half


def run(model: Path, data: Path, cache: Path) -> dict:
    torch.set_num_threads(2)
    results = {
        "model": model.name,
        "model_sha256": sha256_of(model),
        "data": {name: data_fingerprint(data / name) for name in SETS},
        "sets": {},
    }
    for name in SETS:
        cached = set_views(model, data, name, cache)
        crops = len(cached["pids"])
        embed_minutes_per_1000 = float(cached["embed_seconds"]) / 60 / crops * 1000
        per_set = results["sets"][name] = {
            "crops": crops,
            "embed_cpu_minutes_per_1000": round(embed_minutes_per_1000, 2),
        }
        for protocol in PROTOCOLS:
            adapt_on, evaluate_on = protocol_crops(cached, protocol)
            source = BranchLinearHead(*cached["views"].shape[2:])
            rows = per_set[protocol] = {
                "source": figures(source, cached, evaluate_on),
                "crops_adapted_on": int(adapt_on.sum()),
            }
            _, cameras = np.unique(cached["cams"][adapt_on], return_inverse=True)
            for variant, overrides in VARIANTS.items():
                settings = AdaptationSettings(**overrides)
                started = time.perf_counter()
                head, history = adapt_head(cached["views"][adapt_on], cameras, settings, progress=False)
                seconds = time.perf_counter() - started
                rows[variant] = variant_row(figures(head, cached, evaluate_on), history, seconds, adapt_on)
                print(name, protocol, variant, rows["source"], rows[variant], flush=True)
    return {**results, **choices(results)}


def choices(results: dict) -> dict:
    """The default variant (``chosen``), and the one for crops of one camera (``chosen_one_camera``: of the
    variants that need no camera ids, ``CAMERA_FREE``), each the best by ``SELECTION``."""
    camera_free = [name for name, variant in VARIANTS.items() if CAMERA_FREE.items() <= variant.items()]
    picks = {
        "chosen": max(VARIANTS, key=lambda variant: selection_score(results, variant)),
        "chosen_one_camera": max(camera_free, key=lambda variant: selection_score(results, variant)),
    }
    return {key: {"variant": pick, "settings": VARIANTS[pick], "chosen_on": SELECTION} for key, pick in picks.items()}


def network_figures(model, pixels: np.ndarray, cached: Dict[str, np.ndarray], kept: np.ndarray, fitted: np.ndarray):
    """R1 and mAP (%) of a network's embeddings, as ``figures`` scores a head's, and with each camera's mean over
    the ``fitted`` crops removed (``camera centred``: whether camera statistics add to adapting)."""
    features = branch_features(model, pixels, progress=False)
    flat = features.reshape(len(pixels), -1)
    centred = camera_statistics(flat, cached["cams"], fitted, features.shape[1], **STATISTICS["camera centring"])
    return {**scores(flat, cached, kept), CENTRED: scores(centred, cached, kept)}


def run_network(checkpoint: Path, data: Path, sets=SETS, protocols=PROTOCOLS, variants=NETWORK_PAIRINGS) -> dict:
    """``run`` for a training checkpoint (or an IR): its whole network adapted in each of ``variants`` (names in
    ``NETWORK_VARIANTS``) on ``sets`` under ``protocols``; a slice of the whole where a network is slow."""
    torch.set_num_threads(2)
    _, cfg = load_trained_model(checkpoint)
    augmentation = TrainAugmentation(flip_prob=0.5, padding=cfg.data.padding, erasing_prob=cfg.data.erasing_prob)
    results = {
        "model": f"{checkpoint.parent.name}/{checkpoint.name}",  # a run's model.pt: named by its run folder
        "model_sha256": sha256_of(checkpoint),
        "data": {name: data_fingerprint(data / name) for name in sets},
        "variants": {variant: NETWORK_VARIANTS[variant] for variant in variants},
        "sets": {},
    }
    for name in sets:
        query_images, query, gallery_images, gallery = load_test_split(
            data / name, cfg.data.height, cfg.data.width, False
        )
        pixels = np.concatenate([query_images, gallery_images])
        cached = {
            "pids": np.array([r.pid for r in query + gallery]),
            "cams": np.array([r.camid for r in query + gallery]),
            "is_query": np.arange(len(pixels)) < len(query),
        }
        per_set = results["sets"][name] = {"crops": len(pixels)}
        for protocol in protocols:
            adapt_on, evaluate_on = protocol_crops(cached, protocol)
            rows = per_set[protocol] = {
                "source": network_figures(load_trained_model(checkpoint)[0], pixels, cached, evaluate_on, adapt_on),
                "crops_adapted_on": int(adapt_on.sum()),
            }
            _, cameras = np.unique(cached["cams"][adapt_on], return_inverse=True)
            for variant, overrides in results["variants"].items():
                settings = AdaptationSettings(**overrides)
                network = load_trained_model(checkpoint)[0]
                oap = overlap_penalty(cfg, settings)
                adaptee = TrunkAdaptee(network, pixels[adapt_on], augmentation, settings.seed, oap)
                started = time.perf_counter()
                model, history = adapt_features(adaptee, cameras, settings, progress=False)
                seconds = time.perf_counter() - started
                rows[variant] = variant_row(
                    network_figures(model, pixels, cached, evaluate_on, adapt_on), history, seconds, adapt_on
                )
                print(name, protocol, variant, rows["source"], rows[variant], flush=True)
    return results


def camera_statistics(
    features: np.ndarray, cams: np.ndarray, fitted: np.ndarray, num_branches: int, per_camera: bool, standardise: bool
) -> np.ndarray:
    """``features`` [n, N*D] less the mean of the ``fitted`` crops of their camera (of every fitted crop without
    ``per_camera``, or for a camera no fitted crop is from), divided per dimension by those crops' sd with
    ``standardise``, each branch L2-normalised again: label-free statistics, no training."""
    adjusted = np.empty_like(features)
    for camera in np.unique(cams):
        of_camera = fitted & (cams == camera) if per_camera else fitted
        reference = features[of_camera if of_camera.any() else fitted]
        scale = reference.std(axis=0) + 1e-3 if standardise else 1.0
        adjusted[cams == camera] = (features[cams == camera] - reference.mean(axis=0)) / scale
    branches = adjusted.reshape(len(adjusted), num_branches, -1)
    return (branches / np.linalg.norm(branches, axis=2, keepdims=True)).reshape(len(adjusted), -1)


def run_statistics(model: Path, data: Path, cache: Path) -> dict:
    """``run`` for the ``STATISTICS`` variants: the source model's features adjusted by statistics of the crops
    adapted on, instead of adapting."""
    results = {
        "model": model.name,
        "model_sha256": sha256_of(model),
        "data": {name: data_fingerprint(data / name) for name in SETS},
        "variants": STATISTICS,
        "sets": {},
    }
    for name in SETS:
        cached = set_views(model, data, name, cache)
        num_branches = cached["views"].shape[2]
        features = embed(BranchLinearHead(*cached["views"].shape[2:]), cached["views"][:, 0])
        per_set = results["sets"][name] = {"crops": len(features)}
        for protocol in PROTOCOLS:
            fitted, evaluate_on = protocol_crops(cached, protocol)
            rows = per_set[protocol] = {
                "source": scores(features, cached, evaluate_on),
                "crops_adapted_on": int(fitted.sum()),
            }
            for variant, settings in STATISTICS.items():
                started = time.process_time()
                adjusted = camera_statistics(features, cached["cams"], fitted, num_branches, **settings)
                minutes_per_1000 = (time.process_time() - started) / 60 / fitted.sum() * 1000
                rows[variant] = {
                    **scores(adjusted, cached, evaluate_on),
                    "adapt_cpu_minutes_per_1000": round(float(minutes_per_1000), 4),
                }
                print(name, protocol, variant, rows["source"], rows[variant], flush=True)
    return results


def selection_score(results: dict, variant: str) -> float:
    """The mean mAP change over the selection set's protocols."""
    rows = results["sets"][SELECTION_SET]
    return float(np.mean([rows[p][variant]["mAP"] - rows[p]["source"]["mAP"] for p in PROTOCOLS]))


def table(results: dict) -> str:
    """One row per variant: mAP change over the source per set and protocol measured, and the CPU cost per 1,000
    crops."""
    sets = results["sets"]
    columns = [(s, p) for s in SETS if s in sets for p in PROTOCOLS if p in sets[s]]
    header = " | ".join(f"{name} {protocol[:5]}." for name, protocol in columns)
    lines = [
        f"| variant | {header} | CPU min / 1,000 crops (adapting) |",
        "|---" * (2 + len(columns)) + "|",
        "| source mAP | " + " | ".join(f"{sets[s][p]['source']['mAP']:.1f}" for s, p in columns) + " | |",
    ]
    for variant in results.get("variants", VARIANTS):
        deltas = " | ".join(f"{sets[s][p][variant]['mAP'] - sets[s][p]['source']['mAP']:+.1f}" for s, p in columns)
        cost = max(sets[s][p][variant]["adapt_cpu_minutes_per_1000"] for s, p in columns)
        name = variant
        if variant == results.get("chosen_one_camera", {}).get("variant"):
            name = f"**{variant}** (default, crops of one camera)"
        if variant == results.get("chosen", {}).get("variant"):
            name = f"**{variant}** (default)"
        lines.append(f"| {name} | {deltas} | {cost:.2f} |")
    return "\n".join(lines)


DOCS_TABLES = DocsTables.on_page(
    DOCS,
    table,
    {
        "adaptation.json": "adaptation table",
        "adaptation_network.json": "network adaptation table",
        "adaptation_omz_cama.json": "omz cama adaptation table",
        "camera_statistics.json": "camera statistics table",
    },
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", "data")))
    parser.add_argument("--cache", type=Path, default=None, help="folder for each set's pooled maps (outside the repo)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="adapt this training checkpoint's (or IR's) network"
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, default=SETS, help="with --checkpoint: these sets only")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=PROTOCOLS, help="with --checkpoint")
    parser.add_argument("--variants", nargs="+", choices=list(NETWORK_VARIANTS), default=list(NETWORK_PAIRINGS))
    parser.add_argument(
        "--statistics", action="store_true", help="measure the STATISTICS variants (no training) instead"
    )
    parser.add_argument("--output", type=Path, default=None)
    DOCS_TABLES.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        DOCS_TABLES.write(args.write_docs)
        return
    if args.checkpoint:
        measured = run_network(args.checkpoint, args.data, args.sets, args.protocols, args.variants)
        emit({**provenance(), **measured}, args.output)
        return
    if args.cache is None:
        parser.error("--cache is required to measure")
    measure = run_statistics if args.statistics else run
    results = {**provenance(), **measure(args.model, args.data, args.cache)}
    emit(results, args.output)


if __name__ == "__main__":
    main()
