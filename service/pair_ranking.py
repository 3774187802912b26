"""CASN's pairwise re-ranking stage (model_zoo.pair_attention) in the service: the pair head found and checked
at start, and a query's shortlist put in the order of its fused feature + Siamese attention distance.

The min-max of each term runs over the shortlist, not over the whole gallery as in the paper's evaluation
(``python -m training evaluate --pair-head``): a service cannot afford every gallery image's maps per query,
so the same pair can get another fused distance under another shortlist, while the order within one answer
is the paper's rule on those images."""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from model_zoo.contract import OUTPUT_PAIR_MAPS
from model_zoo.pair_attention import PairHead, PairHeadMismatch, pair_head_path
from service.inference import ImageMaps, InferenceModel
from service.schemas import PairAttention
from service.settings import Settings

Hit = Tuple[int, float]  # (gallery id, score)


class PairHeadUnusable(RuntimeError):
    """REID_PAIR_HEAD_PATH names no file, or an artifact that does not belong to the loaded model."""


def load_pair_head(settings: Settings, model: InferenceModel) -> Optional[PairHead]:
    """The configured artifact, else the one beside the model if there is one, else None (and then the model's
    optional pair maps are no longer asked for). An artifact that is there but does not fit refuses the start:
    a stale one beside a re-exported model is a deployment mistake to fix, not to serve around."""
    path = settings.pair_head_path or pair_head_path(model.path)
    if not path.is_file():
        if settings.pair_head_path is None:
            model.stop_asking_for("pair")  # a stripe-layout CASN's pair_maps serve its pair head alone
            return None
        raise PairHeadUnusable(f"REID_PAIR_HEAD_PATH={path}: no such file")
    try:
        head = PairHead.load(path, model.path)
    except PairHeadMismatch as exc:
        raise PairHeadUnusable(
            f"{exc}: export the model again (it writes its pair head beside it), or set "
            f"REID_PAIR_HEAD_PATH "
            "to the artifact exported with this model"
        ) from None
    check_fits(head, path, settings, model)
    return head


def check_fits(head: PairHead, path: Path, settings: Settings, model: InferenceModel) -> None:
    channels = pair_input_channels(model)
    if head.channels != channels or head.weight.shape[1] % head.stripes:
        raise PairHeadUnusable(
            f"{path}: a pair head over {head.stripes} stripe(s) of a {head.channels}-channel map "
            f"needs a model whose pair input "
            f"has that many channels; this one's has {channels or 'none'} (pair_maps, or one "
            f"branch's feature_maps)"
        )
    # a pair_attention query re-embeds its whole shortlist at once: past the queue's bound it could never run
    shortlist = max(settings.max_top_k, settings.rerank_shortlist)
    if shortlist > settings.max_queued_images:
        raise PairHeadUnusable(
            f"with a pair head a query re-embeds up to {shortlist} images (REID_MAX_TOP_K, "
            f"REID_RERANK_SHORTLIST), "
            f"more than REID_MAX_QUEUED_IMAGES={settings.max_queued_images}"
        )


def pair_input_channels(model: InferenceModel) -> int:
    """C of the map A the pair head would read from ``model``: its ``pair_maps`` output's, else its one
    branch's; 0 when it has neither (several branches without pair_maps)."""
    if model.has_pair_maps:
        return model.output_channels(OUTPUT_PAIR_MAPS)
    contract = model.contract
    return contract.branch_dim if contract.num_branches == 1 else 0


def rank_shortlist(
    head: PairHead,
    query_embedding: np.ndarray,
    query_maps: ImageMaps,
    hits: List[Hit],
    found: dict,
    maps: Dict[int, ImageMaps],
    top_k: int,
) -> Tuple[List[Hit], List[dict]]:
    """The first ``top_k`` of ``hits`` by fused distance, and each one's Match fields (pair_distance,
    pair_attention). ``found`` holds each hit's stored embedding, ``maps`` its re-embedded maps."""
    if not hits:
        return [], []
    embeddings = np.stack([found[i][1] for i, _ in hits])
    ranking = head.rank(
        query_embedding, query_maps.pair_input, embeddings, np.stack([maps[i].pair_input for i, _ in hits])
    )
    order = np.argsort(ranking.distances, kind="stable")[:top_k]  # ties keep the index's (score) order
    fields = [
        {
            "pair_distance": float(ranking.distances[j]),
            "pair_attention": PairAttention(
                query_grid=ranking.query_attention[j].tolist(), gallery_grid=ranking.gallery_attention[j].tolist()
            ),
        }
        for j in order
    ]
    return [hits[j] for j in order], fields
