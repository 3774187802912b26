"""Queries by a track: several images of one person (a tracker's crops), answered as one query.

Two ways to aggregate them. ``mean``: the track's embeddings averaged branch by branch and each branch
re-normalised, so the aggregate is searched, scored and explained (RAM) exactly like one image's embedding:
its score is still the mean over branches of the cosine, and its heatmaps still average to it. ``best``: each
image searched on its own, and each gallery item scored by its best image; that is exact for the top k,
since an item in the top k by best score is in the top k of the image that gives it its best score.
"""

from typing import Callable, Dict, Hashable, List, Literal, Optional, Tuple

import numpy as np

from model_zoo.contract import split_branches
from service.index import first_per_group

Aggregate = Literal["mean", "best"]
Hit = Tuple[int, float]  # (gallery id, score)


def mean_embedding(embeddings: np.ndarray, num_branches: int) -> np.ndarray:
    """[T, N*D] -> [N*D]: the per-branch mean of the track, each branch back to unit length. One image is
    returned as it is, so a single-image query answers to the last bit as before."""
    if len(embeddings) == 1:
        return embeddings[0]
    branches = split_branches(embeddings.astype(np.float64), num_branches).mean(axis=0)
    norms = np.linalg.norm(branches, axis=1, keepdims=True)
    return (branches / np.maximum(norms, np.finfo(np.float64).tiny)).reshape(-1).astype(np.float32)


def merge_best(
    searches: List[List[Hit]], k: int, group: Optional[Callable[[int], Hashable]] = None
) -> Tuple[List[Hit], Dict[int, int]]:
    """Each image's hits merged, each id at its best score: the first ``k`` (with ``group``, the best of each
    group), and for each id the track image that gave its score."""
    best: Dict[int, Tuple[float, int]] = {}
    for image, hits in enumerate(searches):
        for item_id, score in hits:
            if item_id not in best or score > best[item_id][0]:
                best[item_id] = (score, image)
    ranked = sorted(((item_id, score) for item_id, (score, _) in best.items()), key=lambda hit: -hit[1])
    if group is not None:
        ranked = first_per_group(ranked, group)
    ranked = ranked[:k]
    return ranked, {item_id: best[item_id][1] for item_id, _ in ranked}
