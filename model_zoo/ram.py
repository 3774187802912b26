"""Ranking Activation Maps (CAMA section 3.4, eq. 10), in numpy so the service needs no torch.

For a query with per-branch unit features f_q^i and a gallery image with feature maps F_g^i [D, h, w]:
    R^i(x, y) = <f_q^i, F_g^i(x, y)> / ||f_g^i||,   f_g^i = GAP(F_g^i)
so the mean of R^i over the grid is the cosine similarity of branch i, and the aggregate map (the mean over
branches) averages to the retrieval score: the mean over branches of the cosine similarities. The query's own
map R_q^q is the same with the query's maps in place of the gallery's.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class RankingActivationMaps:
    per_branch: np.ndarray  # [N, h, w]
    aggregate: np.ndarray  # [h, w], the mean over branches

    @property
    def score(self) -> float:
        return float(self.aggregate.mean())


def ranking_activation_maps(
    query_branch_features: np.ndarray, gallery_feature_maps: np.ndarray
) -> RankingActivationMaps:
    """RAM of one gallery image for one query.

    query_branch_features: [N, D], each row L2-normalised (the query's embedding split per branch).
    gallery_feature_maps: [N, D, h, w], the gallery image's maps F^i as the model outputs them.
    """
    maps = gallery_feature_maps.astype(np.float64)
    gap_norm = np.linalg.norm(maps.mean(axis=(2, 3)), axis=1)
    per_branch = np.einsum("nd,ndhw->nhw", query_branch_features.astype(np.float64), maps)
    per_branch /= np.maximum(gap_norm, np.finfo(np.float64).tiny)[:, None, None]
    return RankingActivationMaps(per_branch=per_branch, aggregate=per_branch.mean(axis=0))
