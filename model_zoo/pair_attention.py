"""CASN's pairwise attention term at test time, torch-free: the pair-head artifact, and the re-ranking of a
gallery (or a service's shortlist) by features and Siamese attention together (CASN section 4, "the l2 distance
of the attention maps and l2 distance of the feature vectors are normalized and summed"; design 3.2-3.3).

Why it is a separate artifact: the term depends on the query and the gallery image jointly (through the pair
head's indicator a), so no single-image embedding can hold it and FAISS cannot index it. It ships beside the
ONNX file as ``<model>.pair_head.npz``, bound to that file by its sha256. It reads the backbone map A of each
image: on CASN's IDE layout that is the contract's one feature map (f = GAP(A)); on the stripe (PCB) layout the
contract's maps are the reduced stripes and A comes from the optional ``pair_maps`` output.

For a query q and a gallery image g, with the pair head in eval mode (its batch norm folded into the first
layer: h = W (f_q - f_g) + b), S stripes (1 for IDE, 6 for PCB):
    f = [g_1; ...; g_S]                                  g_p the mean of A over stripe p (adaptive-pooling bins)
    a = 1[W^T (1[h > 0] * w_same) > 0]                   the indicator of eq. 4, d z_same / d f^- > 0, [S D]
    w_k = sum_p a_{p,k}                                  Grad-CAM's channel weight, pooled over the stripes
    M_j = ReLU(sum_k w_k A_j^k) / hw, j = q, g           Siamese Grad-CAM in closed form
    profile_j = the rows' maxima of M_j / max M_j, cropped to the rows above t, resized to h
    d_att = ||profile_q - profile_g||_2                  (an all-zero map: a zero profile)
    d = minmax(d_feature) + minmax(d_att)               per query over the gallery (the shortlist in a service)
with d_feature the Euclidean distance of the L2-normalised embeddings. Lower d ranks first. This is the
training objective's consistency map (training/objectives/casn.py) in numpy.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from model_zoo.files import sha256_of

PAIR_HEAD_SUFFIX = ".pair_head.npz"
ARTIFACT_VERSION = 2
READABLE_ARTIFACT_VERSIONS = (1, 2)  # 2 adds ``stripes``: a version 1 artifact is an IDE head (1 stripe)


def pair_head_path(model_path: Union[str, Path]) -> Path:
    """Where a model's pair-head artifact lives: beside it, ``model.onnx`` -> ``model.pair_head.npz``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + PAIR_HEAD_SUFFIX)


class PairHeadMismatch(ValueError):
    """The artifact was exported with another model file."""


@dataclass(frozen=True)
class PairHead:
    weight: np.ndarray  # [H, D], the first layer with its batch norm folded in
    bias: np.ndarray  # [H]
    same_weight: np.ndarray  # [H], the second layer's row of the "same person" logit
    row_threshold: float
    model_sha256: str
    stripes: int = 1  # S: the pair head reads [g_1; ...; g_S], so weight is [H, S * D] for a D-channel A

    def save(self, path: Union[str, Path]) -> None:
        np.savez(
            path,
            version=ARTIFACT_VERSION,
            weight=self.weight,
            bias=self.bias,
            same_weight=self.same_weight,
            row_threshold=self.row_threshold,
            model_sha256=self.model_sha256,
            stripes=self.stripes,
        )

    @classmethod
    def load(cls, path: Union[str, Path], model_path: Union[str, Path, None] = None) -> "PairHead":
        """Read an artifact; with ``model_path``, refuse it unless it was exported with that very file."""
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) not in READABLE_ARTIFACT_VERSIONS:
                raise ValueError(
                    f"{path}: pair-head artifact version {int(data['version'])}, this code reads "
                    f"{READABLE_ARTIFACT_VERSIONS}"
                )
            head = cls(
                data["weight"].astype(np.float32),
                data["bias"].astype(np.float32),
                data["same_weight"].astype(np.float32),
                float(data["row_threshold"]),
                str(data["model_sha256"]),
                int(data["stripes"]) if "stripes" in data.files else 1,
            )
        if model_path is not None and sha256_of(model_path) != head.model_sha256:
            raise PairHeadMismatch(f"{path} belongs to another model file than {model_path}")
        return head

    @property
    def channels(self) -> int:
        """D, the channels of the map A this head reads."""
        return self.weight.shape[1] // self.stripes

    def features(self, maps: np.ndarray) -> np.ndarray:
        """f [G, S D] of maps A [G, D, h, w]: the S stripe means, stripe after stripe (S = 1: GAP)."""
        return stripe_means(maps, self.stripes).reshape(len(maps), -1)

    def indicator(self, difference: np.ndarray) -> np.ndarray:
        """a [P, S D] for feature differences f_q - f_g [P, S D]."""
        hidden = difference @ self.weight.T + self.bias
        return ((hidden > 0) * self.same_weight) @ self.weight > 0

    def attention_maps(
        self, query_feature: np.ndarray, query_map: np.ndarray, gallery_features: np.ndarray, gallery_maps: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray]:
        """(M_q, M_g), each [G, h, w]: the Siamese attention of one query (f [S D], A [D, h, w]) and of each
        gallery image (f [G, S D], A [G, D, h, w]) in their pair; M_q differs per pair, through the indicator."""
        a = self.indicator(query_feature[None] - gallery_features)
        weights = a.reshape(len(a), self.stripes, -1).sum(axis=1, dtype=np.float32)
        cells = query_map.shape[1] * query_map.shape[2]
        query_attention = np.maximum(np.einsum("gd,dhw->ghw", weights, query_map), 0) / cells
        gallery_attention = np.maximum(np.einsum("gd,gdhw->ghw", weights, gallery_maps), 0) / cells
        return query_attention, gallery_attention

    def profile_distances(self, query_attention: np.ndarray, gallery_attention: np.ndarray) -> np.ndarray:
        """d_att [G] of the pairs' attention maps M_q, M_g [G, h, w]: their aligned row profiles apart."""
        height = query_attention.shape[1]
        query_profiles = [aligned_profile(p, self.row_threshold, height) for p in row_profiles(query_attention)]
        gallery_profiles = [aligned_profile(p, self.row_threshold, height) for p in row_profiles(gallery_attention)]
        return np.array([np.linalg.norm(q - g) for q, g in zip(query_profiles, gallery_profiles)])

    def rank(
        self,
        query_embedding: np.ndarray,
        query_map: np.ndarray,
        gallery_embeddings: np.ndarray,
        gallery_maps: np.ndarray,
        gallery_features: Optional[np.ndarray] = None,
    ) -> "PairRanking":
        """CASN's test-time rule for one query: its embedding [E] and backbone map A [D, h, w], the gallery's
        embeddings [G, E] and maps [G, D, h, w]. The min-max runs over these G images only. ``gallery_features``
        (``self.features(gallery_maps)``) may be given to spare recomputing them for every query."""
        if gallery_features is None:
            gallery_features = self.features(gallery_maps)
        query_attention, gallery_attention = self.attention_maps(
            self.features(query_map[None])[0], query_map, gallery_features, gallery_maps
        )
        feature_distances = np.linalg.norm(gallery_embeddings - query_embedding, axis=1)
        distances = fused_distances(feature_distances, self.profile_distances(query_attention, gallery_attention))
        return PairRanking(distances, query_attention, gallery_attention)


def stripe_means(maps: np.ndarray, stripes: int) -> np.ndarray:
    """[G, S, D]: the mean of maps [G, D, h, w] over each of S horizontal stripes, with adaptive average
    pooling's bins (rows floor(p h / S) to ceil((p + 1) h / S)), as CASN's stripe layout pools in training."""
    height = maps.shape[2]
    bounds = [(p * height // stripes, -(-(p + 1) * height // stripes)) for p in range(stripes)]
    return np.stack([maps[:, :, start:end].mean(axis=(2, 3)) for start, end in bounds], axis=1)


@dataclass(frozen=True)
class PairRanking:
    distances: np.ndarray  # d [G], lower = more alike, in [0, 2]
    query_attention: np.ndarray  # M_q [G, h, w]
    gallery_attention: np.ndarray  # M_g [G, h, w]


def row_profiles(attention: np.ndarray) -> np.ndarray:
    """[P, h, w] maps -> [P, h]: each map divided by its maximum (a zero map stays zero), then each row's maximum."""
    peak = attention.reshape(len(attention), -1).max(axis=1)
    return (attention / np.maximum(peak, 1e-12)[:, None, None]).max(axis=2)


def aligned_profile(profile: np.ndarray, threshold: float, length: int) -> np.ndarray:
    """The profile from its first to its last value above ``threshold``, linearly resized to ``length`` (the
    ends kept, as torch's align_corners=True); a profile with nothing above the threshold gives zeros."""
    above = np.flatnonzero(profile > threshold)
    if len(above) == 0:
        return np.zeros(length)
    crop = profile[above[0] : above[-1] + 1]
    return np.interp(np.linspace(0, len(crop) - 1, length), np.arange(len(crop)), crop)


def min_max(values: np.ndarray) -> np.ndarray:
    spread = values.max() - values.min()
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)


def fused_distances(feature_distances: np.ndarray, attention_distances: np.ndarray) -> np.ndarray:
    """d = minmax(d_feature) + minmax(d_att) over one query's gallery: both terms weigh equally."""
    return min_max(np.asarray(feature_distances, np.float64)) + min_max(np.asarray(attention_distances, np.float64))
