"""Single-query Market-1501 evaluation: CMC rank-1/5/10, mAP and mINP, for the concatenated embedding and for
each branch alone and each prefix of branches (CAMA Table 5).

Protocol: for each query, gallery images of the same pid taken by the same camera are ignored, and so are
junk images (pid -1); distractors (pid 0) stay as negatives. Queries with no valid match are skipped.
Similarity is the inner product of L2-normalised per-branch features (cosine), ties broken by gallery order.

Opt-in k-reciprocal re-ranking (``Rerank``, model_zoo.rerank) adds ``"all_rerank"``: the whole embedding's
figures from re-ranked distances, with the variant and parameters that made them.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from model_zoo.architectures.common import branch_features as normalised_branch_features
from model_zoo.rerank import (
    DEFAULT_K1,
    DEFAULT_K2,
    DEFAULT_LAMBDA,
    check_parameters,
    rerank_all_queries,
    rerank_one_query_at_a_time,
)
from training.checkpoints import load_trained_model
from training.data.market import ImageRecord, decode_records, read_split

log = logging.getLogger(__name__)
RANKS = (1, 5, 10)
PAIR_KEY = "all_pair"  # CASN: features and pairwise attention together
RERANK_KEY = "all_rerank"
# "all": every query and the gallery in one graph (the papers' protocol); "single": each query alone with the
# gallery, queries never seeing each other (what the service can do)
RERANK_VARIANTS = {"all": rerank_all_queries, "single": rerank_one_query_at_a_time}


@dataclass(frozen=True)
class Rerank:
    """k-reciprocal re-ranking of the whole embedding, reported under ``RERANK_KEY`` beside the plain figures."""

    variant: str = "all"
    k1: int = DEFAULT_K1
    k2: int = DEFAULT_K2
    lambda_value: float = DEFAULT_LAMBDA

    def __post_init__(self):
        if self.variant not in RERANK_VARIANTS:
            raise ValueError(f"re-ranking variant must be one of {sorted(RERANK_VARIANTS)}, not {self.variant!r}")
        check_parameters(self.k1, self.k2, self.lambda_value)

    def distances(self, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Re-ranked distances [Q, G] (lower = more alike) of flat query [Q, F] and gallery [G, F] features."""
        return RERANK_VARIANTS[self.variant](query, gallery, self.k1, self.k2, self.lambda_value)

    def figures(self) -> Dict[str, object]:
        """The parameters, stored with the metrics they produced."""
        return {"rerank_variant": self.variant, "k1": self.k1, "k2": self.k2, "lambda_value": self.lambda_value}


def market_metrics(
    similarity: np.ndarray, query_pids, query_cams, gallery_pids, gallery_cams, ranks: Iterable[int] = RANKS
) -> Dict[str, float]:
    """CMC at ``ranks``, mAP and mINP from a [Q, G] similarity matrix (higher = more similar)."""
    query_pids, query_cams = np.asarray(query_pids), np.asarray(query_cams)
    gallery_pids, gallery_cams = np.asarray(gallery_pids), np.asarray(gallery_cams)
    max_rank = max(ranks)
    cmc_sum = np.zeros(max_rank)
    aps, inps = [], []
    for q in range(similarity.shape[0]):
        order = np.argsort(-similarity[q], kind="stable")
        pids, cams = gallery_pids[order], gallery_cams[order]
        valid = (pids != -1) & ~((pids == query_pids[q]) & (cams == query_cams[q]))
        matches = (pids[valid] == query_pids[q]).astype(np.float64)
        if query_pids[q] <= 0 or not matches.any():
            continue
        hits = np.flatnonzero(matches)
        cmc = np.zeros(max_rank)
        cmc[hits[0] :] = 1.0 if hits[0] < max_rank else 0.0
        cmc_sum += cmc
        aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
        inps.append(len(hits) / (hits[-1] + 1))
    if not aps:
        raise ValueError("no query has a valid gallery match")
    metrics = {f"rank{r}": float(cmc_sum[r - 1] / len(aps)) for r in ranks}
    metrics.update(mAP=float(np.mean(aps)), mINP=float(np.mean(inps)), num_queries=len(aps))
    return metrics


@torch.no_grad()
def branch_features(
    model: torch.nn.Module, images: np.ndarray, batch_size: int = 64, device: str = "cpu", progress: bool = True
) -> np.ndarray:
    """Per-branch L2-normalised features [num_images, N, D] from a model in eval mode."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress, leave=False):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        chunks.append(normalised_branch_features(model(batch).feature_maps).cpu().numpy())
    return np.concatenate(chunks)


def market_ids(query: List[ImageRecord], gallery: List[ImageRecord]) -> Dict[str, list]:
    """The person and camera ids ``market_metrics`` takes, from the split's records."""
    return dict(
        query_pids=[r.pid for r in query],
        query_cams=[r.camid for r in query],
        gallery_pids=[r.pid for r in gallery],
        gallery_cams=[r.camid for r in gallery],
    )


def features_metrics(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    query: List[ImageRecord],
    gallery: List[ImageRecord],
    rerank: Optional[Rerank] = None,
) -> Dict[str, Dict[str, float]]:
    """Metrics for the whole embedding, each branch alone and each prefix of branches; with ``rerank``, also
    the whole embedding re-ranked, under ``RERANK_KEY``."""
    ids = market_ids(query, gallery)
    num_branches = query_feats.shape[1]

    def score(branches: List[int]) -> Dict[str, float]:
        q = query_feats[:, branches].reshape(len(query_feats), -1)
        g = gallery_feats[:, branches].reshape(len(gallery_feats), -1)
        return market_metrics(q @ g.T / len(branches), **ids)

    results = {"all": score(list(range(num_branches)))}
    if rerank is not None:
        distances = rerank.distances(
            query_feats.reshape(len(query_feats), -1), gallery_feats.reshape(len(gallery_feats), -1)
        )
        results[RERANK_KEY] = {**market_metrics(-distances, **ids), **rerank.figures()}
    if num_branches > 1:
        for i in range(num_branches):
            results[f"branch{i + 1}"] = score([i])
        for i in range(2, num_branches):
            results[f"branches1-{i}"] = score(list(range(i)))
    return results


def load_test_split(root: Path, height: int, width: int, progress: bool = True):
    """Decoded query and gallery images with their records."""
    query, _ = read_split(Path(root) / "query")
    gallery, _ = read_split(Path(root) / "bounding_box_test")
    query_images, query, _ = decode_records(query, height, width, progress, "decode query")
    gallery_images, gallery, _ = decode_records(gallery, height, width, progress, "decode gallery")
    return query_images, query, gallery_images, gallery


def test_roots(roots: Sequence[Path]) -> List[str]:
    """The folders among ``roots`` that have a test split (query and bounding_box_test)."""
    return [str(r) for r in roots if (Path(r) / "query").is_dir() and (Path(r) / "bounding_box_test").is_dir()]


def set_names(roots: Sequence[Path]) -> List[str]:
    """A name per evaluation folder: its own name, with its parent's where two would clash."""
    names = [Path(r).name for r in roots]
    return [f"{Path(r).parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(roots, names)]


def evaluate_features(
    embed: Callable[[np.ndarray], np.ndarray],
    roots: Sequence[Path],
    height: int,
    width: int,
    progress: bool = True,
    rerank: Optional[Rerank] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Each folder's query against its gallery, with ``embed`` (uint8 images -> per-branch features [n, N, D]):
    {set name: {"all": ..., "branch1": ..., ...}}. PyTorch models and exported files share this route."""
    results = {}
    for name, root in zip(set_names(roots), roots):
        query_images, query, gallery_images, gallery = load_test_split(root, height, width, progress)
        results[name] = features_metrics(embed(query_images), embed(gallery_images), query, gallery, rerank)
    return results


def evaluate_sets(
    model: torch.nn.Module,
    roots: Sequence[Path],
    height: int,
    width: int,
    device: str = "cpu",
    progress: bool = True,
    rerank: Optional[Rerank] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """A PyTorch model on each folder: {set name: {"all": ..., "branch1": ..., ...}}."""
    return evaluate_features(
        lambda images: branch_features(model, images, device=device, progress=progress),
        roots,
        height,
        width,
        progress,
        rerank,
    )


def onnx_branch_features(
    session, images: np.ndarray, num_branches: int, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Per-branch features [num_images, N, D] from an exported model's ``embedding`` output."""
    from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, split_branches

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed (onnx)", disable=not progress, leave=False):
        (embedding,) = session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: images[start : start + batch_size]})
        chunks.append(split_branches(embedding, num_branches))
    return np.concatenate(chunks)


def evaluate_onnx(
    path: Path, data_roots: Sequence[Path], progress: bool = True, rerank: Optional[Rerank] = None
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Evaluate an exported ONNX file through ONNX Runtime, as the service runs it, on each folder."""
    from model_zoo.contract import open_cpu_session

    session, contract = open_cpu_session(path)
    return evaluate_features(
        lambda images: onnx_branch_features(session, images, contract.num_branches, progress=progress),
        data_roots,
        contract.input_height,
        contract.input_width,
        progress,
        rerank,
    )


def onnx_embeddings_and_pair_maps(session, images: np.ndarray, batch_size: int = 64, progress: bool = True):
    """(embeddings [n, N*D], the maps A [n, C, h, w] CASN's pair head reads) from an exported model: its
    ``pair_maps`` output when it has one (stripe layout), else its one branch's ``feature_maps`` (IDE)."""
    from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, OUTPUT_PAIR_MAPS

    has_pair_maps = OUTPUT_PAIR_MAPS in {node.name for node in session.get_outputs()}
    names = [OUTPUT_EMBEDDING, OUTPUT_PAIR_MAPS if has_pair_maps else OUTPUT_FEATURE_MAPS]
    outputs = [
        session.run(names, {INPUT_IMAGES: images[start : start + batch_size]})
        for start in tqdm(
            range(0, len(images), batch_size), desc="embed (onnx, maps)", disable=not progress, leave=False
        )
    ]
    maps = np.concatenate([m for _, m in outputs])
    return np.concatenate([e for e, _ in outputs]), maps if has_pair_maps else maps[:, 0]


def pair_attention_metrics(
    head, query, gallery, query_records: List[ImageRecord], gallery_records: List[ImageRecord]
) -> Dict[str, float]:
    """Market metrics of CASN's test-time rule (model_zoo.pair_attention): per query, min-max normalised feature
    distance plus min-max normalised Siamese attention distance. ``query``/``gallery``: (embeddings, maps A)."""
    (query_embeddings, query_maps), (gallery_embeddings, gallery_maps) = query, gallery
    gallery_features = head.features(gallery_maps)  # once for every query
    distances = np.stack(
        [
            head.rank(embedding, maps, gallery_embeddings, gallery_maps, gallery_features).distances
            for embedding, maps in zip(query_embeddings, query_maps)
        ]
    )
    return market_metrics(-distances, **market_ids(query_records, gallery_records))


def evaluate_pair_attention(
    path: Path, pair_head: Path, data_roots: Sequence[Path], progress: bool = True
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """CASN's features + pairwise attention rule, through ONNX Runtime and the pair-head artifact as a service
    runs them: {set name: {PAIR_KEY: ...}}."""
    from model_zoo.contract import open_cpu_session
    from model_zoo.pair_attention import PairHead

    session, contract = open_cpu_session(path)
    head = PairHead.load(pair_head, path)
    results = {}
    for name, root in zip(set_names(data_roots), data_roots):
        query_images, query, gallery_images, gallery = load_test_split(
            root, contract.input_height, contract.input_width, progress
        )
        outputs = [
            onnx_embeddings_and_pair_maps(session, images, progress=progress)
            for images in (query_images, gallery_images)
        ]
        results[name] = {PAIR_KEY: pair_attention_metrics(head, *outputs, query, gallery)}
    return results


def evaluate_checkpoint(
    checkpoint: Path,
    data_roots: Optional[Sequence[Path]] = None,
    device: str = "cpu",
    progress: bool = True,
    rerank: Optional[Rerank] = None,
    pair_head: Optional[Path] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Evaluate a training checkpoint, or an exported .onnx file, on each of ``data_roots`` (for a checkpoint,
    by default the sets its training evaluated): {set name: {"all": ..., "branch1": ..., ...}}, and with
    ``rerank`` the re-ranked whole embedding under ``RERANK_KEY``; with ``pair_head`` (a CASN .onnx file's
    artifact) CASN's features + pairwise attention rule under ``PAIR_KEY``."""
    if Path(checkpoint).suffix == ".onnx":
        if not data_roots:
            raise ValueError("evaluating an ONNX file needs at least one --data-root")
        results = evaluate_onnx(checkpoint, data_roots, progress, rerank)
        if pair_head is not None:
            for name, figures in evaluate_pair_attention(checkpoint, pair_head, data_roots, progress).items():
                results[name].update(figures)
        return results
    if pair_head is not None:
        raise ValueError(
            "the pairwise attention term is evaluated on an exported .onnx file with its pair-head artifact"
        )
    model, cfg = load_trained_model(checkpoint, device)
    roots = list(data_roots or cfg.run.eval_roots or test_roots(cfg.data.roots))
    return evaluate_sets(model, roots, cfg.data.height, cfg.data.width, device, progress, rerank)


def single_branch_keys(figures: Dict[str, Dict[str, float]]) -> List[str]:
    """The keys of the branches alone (``branch1``, ``branch2``, ...), in order, without the prefixes
    (``branches1-2``)."""
    return [key for key in figures if re.fullmatch(r"branch\d+", key)]


def results_table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """One markdown row per set: the embedding's rank-1/5/10, mAP, mINP and each branch's mAP alone; below it,
    where the results have one, the re-ranked embedding's row, named with its variant and parameters."""
    lines = [
        "| set | queries | rank-1 | rank-5 | rank-10 | mAP | mINP | per-branch mAP |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, whole: Dict[str, float], branches: str) -> str:
        cells = [
            name,
            str(whole["num_queries"]),
            *(f"{100 * whole[k]:.1f}" for k in ("rank1", "rank5", "rank10", "mAP", "mINP")),
            branches,
        ]
        return "| " + " | ".join(cells) + " |"

    for name, figures in results.items():
        branches = ", ".join(f"{100 * figures[k]['mAP']:.1f}" for k in single_branch_keys(figures)) or "-"
        lines.append(row(name, figures["all"], branches))
        if RERANK_KEY in figures:
            reranked = figures[RERANK_KEY]
            label = (
                f"{name} (re-ranked {reranked['rerank_variant']}, k1={reranked['k1']} k2={reranked['k2']} "
                f"lambda={reranked['lambda_value']})"
            )
            lines.append(row(label, reranked, "-"))
        if PAIR_KEY in figures:
            lines.append(row(f"{name} (features + pairwise attention)", figures[PAIR_KEY], "-"))
    return "\n".join(lines)
