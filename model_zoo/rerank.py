"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification with k-reciprocal
Encoding"), in numpy so the service can use it without torch. The evaluation code and the service share it.

What this module owns: the re-ranked distance d* = (1 - lambda) d_J + lambda d between queries and gallery
images, in three forms:
- ``rerank_all_queries``: the papers' protocol, every query and the whole gallery in one neighbour graph, so
  queries are each other's neighbours;
- ``rerank_one_query_at_a_time``: each query alone with the gallery (queries never see each other), what a
  service can do; equal to ``rerank_all_queries`` called with one query at a time;
- ``rerank_shortlist``: one query against a shortlist of gallery vectors (a service's index hits);
and the Jaccard distance d_J alone between every pair of a set (``jaccard_distances``), which
``training.adaptation`` clusters by.

The algorithm, for a graph of nodes (queries and gallery images) with original distances d:
1. d is the squared Euclidean distance of the features; for the project's features (each branch L2-normalised,
   then concatenated) that is N (2 - 2 s) with s the mean over the N branches of the cosine. Each node's row is
   divided by its largest value (as the authors' code does), which makes the result independent of N.
2. N(p, k): p itself, then the k nodes nearest p (ties in node order). R(p, k): the members q of N(p, k) that
   have p in N(q, k), the k-reciprocal neighbours.
3. R*(p): R(p, k1), plus R(q, k1/2) of each q in R(p, k1) when more than 2/3 of R(q, k1/2) lies in R(p, k1).
4. V_p: over R*(p), Gaussian kernel weights exp(-d(p, g)) summing to 1 (zero elsewhere); then local query
   expansion: V_p becomes the mean of V over N(p, k2 - 1) (p and its k2 - 1 nearest).
5. d_J(p, g) = 1 - sum min(V_p, V_g) / sum max(V_p, V_g), summed over only the nodes where V_p is non-zero
   (an inverted index from node to the rows that weight it). The rows of V sum to 1, so sum max = 2 - sum min.

Parameters are clamped to the graph: a node has at most n - 1 others, so k1 becomes min(k1, n - 1) and k2
min(k2, n); with n nodes (n - 1 gallery vectors for one query) and k1 >= n - 1, every neighbour list is the
whole graph, the reciprocity test passes for everyone and re-ranking reduces to comparing the weight profiles.

One deliberate choice beyond the paper: a node always comes first in its own neighbour list, even where exact
duplicates tie with it, so R(p, k) always holds p and no row of V is empty (no NaN on duplicate images).
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

DEFAULT_K1, DEFAULT_K2, DEFAULT_LAMBDA = 20, 6, 0.3
EXPANSION_OVERLAP = 2 / 3  # R(q, k1/2) joins R*(p) when more than this share of it is in R(p, k1)

Distance = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, cols) node ids -> row-normalised d


def check_parameters(k1: int, k2: int, lambda_value: float) -> None:
    """ValueError unless k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1."""
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be a whole number >= 1, not {k1}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be a whole number >= 1, not {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], not {lambda_value}")


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)] in float32, never negative."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return np.maximum(d, 0)


def self_distances(x: np.ndarray) -> np.ndarray:
    """``squared_distances(x, x)`` with an exact zero diagonal (float rounding leaves tiny values there)."""
    d = squared_distances(x, x)
    np.fill_diagonal(d, 0)
    return d


# ----------------------------------------------------------------------------------------------- public API


def rerank_all_queries(
    query: np.ndarray,
    gallery: np.ndarray,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> np.ndarray:
    """Re-ranked distances [Q, G] (lower = more alike) of query features [Q, F] to gallery features [G, F],
    all queries and the gallery in one graph (the papers' protocol)."""
    query, gallery = _check_features(query, gallery, k1, k2, lambda_value)
    return rerank_distance_matrix(self_distances(np.concatenate([query, gallery])), len(query), k1, k2, lambda_value)


def rerank_distance_matrix(
    distance: np.ndarray,
    num_queries: int,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> np.ndarray:
    """Re-ranking from a precomputed [n, n] distance matrix over the graph's nodes, the ``num_queries``
    queries first, then the gallery (any non-negative distance; squared Euclidean is the paper's): [Q, n - Q]."""
    check_parameters(k1, k2, lambda_value)
    distance = np.asarray(distance)
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1] or not 0 <= num_queries <= len(distance):
        raise ValueError(
            f"need a square [n, n] distance matrix and 0 <= num_queries <= n, got {distance.shape} and {num_queries}"
        )
    if num_queries == 0 or num_queries == len(distance):
        return np.zeros((num_queries, len(distance) - num_queries))
    k1, k2 = clamp_parameters(k1, k2, len(distance))
    return _rerank(_matrix_graph(distance, k1, k2, num_queries), k1, k2, lambda_value)


def rerank_one_query_at_a_time(
    query: np.ndarray,
    gallery: np.ndarray,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> np.ndarray:
    """Re-ranked distances [Q, G], each query in a graph of its own with the gallery: row q equals
    ``rerank_all_queries(query[q:q+1], gallery)``. The gallery's distances and neighbour lists are computed
    once; per query only the query's row is new and it is slotted into the gallery's lists."""
    query, gallery = _check_features(query, gallery, k1, k2, lambda_value)
    if len(gallery) == 0:
        return np.zeros((len(query), 0))
    k1, k2 = clamp_parameters(k1, k2, len(gallery) + 1)
    length = _list_length(k1, k2)
    gallery_distance = self_distances(gallery)
    gallery_lists = _neighbour_lists(gallery_distance, min(length, len(gallery)))  # one short when k1 = G
    gallery_list_distance = np.take_along_axis(gallery_distance, gallery_lists, axis=1)
    gallery_max = gallery_distance.max(axis=1)
    rows = []
    for to_query in squared_distances(query, gallery):
        graph = _Graph(
            _lists_with_query(to_query, gallery_lists, gallery_list_distance, length),
            _distance_with_query(to_query, gallery_distance, gallery_max),
            1,
        )
        rows.append(_rerank(graph, k1, k2, lambda_value)[0])
    return np.stack(rows) if rows else np.zeros((0, len(gallery)))


def rerank_shortlist(
    query: np.ndarray,
    shortlist: np.ndarray,
    k1: int = DEFAULT_K1,
    k2: int = DEFAULT_K2,
    lambda_value: float = DEFAULT_LAMBDA,
) -> Tuple[np.ndarray, np.ndarray]:
    """One query vector [F] against shortlist vectors [S, F] (e.g. an index's top S hits): (re-ranked
    distances [S], order [S], the shortlist positions from most to least alike; ties keep shortlist order).

    The graph is the query and the shortlist, S + 1 nodes, so k1 is clamped to S and k2 to S + 1: a shortlist
    smaller than k1 is re-ranked with k1 = S (see the module docstring). An empty shortlist gives empty arrays."""
    query = np.asarray(query)
    if query.ndim != 1:
        raise ValueError(f"the query must be one vector [F], got shape {query.shape}")
    distances = rerank_all_queries(query[None], shortlist, k1, k2, lambda_value)[0]
    return distances, np.argsort(distances, kind="stable")


def jaccard_distances(features: np.ndarray, k1: int = DEFAULT_K1, k2: int = DEFAULT_K2) -> np.ndarray:
    """d_J [n, n] between every pair of feature rows [n, F], all in one graph (lambda 0: no original distance):
    what clustering-based domain adaptation groups by (Cluster Contrast's k1 30, k2 6). Symmetric up to
    rounding, zero on the diagonal; [n, n] float32, so memory grows with n squared."""
    features, _ = _check_features(features, features, k1, k2, 0.0)
    if len(features) < 2:
        return np.zeros((len(features), len(features)), np.float32)
    distance = self_distances(features)
    k1, k2 = clamp_parameters(k1, k2, len(distance))
    graph = _matrix_graph(distance, k1, k2, len(distance))
    jaccard = _jaccard_distance(_encoding(graph, k1, k2), len(distance)).astype(np.float32)
    np.fill_diagonal(jaccard, 0)
    return jaccard


def clamp_parameters(k1: int, k2: int, num_nodes: int) -> Tuple[int, int]:
    """k1 and k2 for a graph of ``num_nodes`` nodes: a neighbour list cannot outgrow the graph."""
    return int(max(1, min(k1, num_nodes - 1))), int(max(1, min(k2, num_nodes)))


# -------------------------------------------------------------------------------------- the graph's pieces


@dataclass
class _Graph:
    neighbours: np.ndarray  # [n, L] node ids: each node, then its nearest in order (ties by id)
    distance: Distance  # row-normalised original distance of node pairs (broadcasting index arrays)
    num_queries: int  # nodes 0..Q-1 are the queries, the rest the gallery


def _matrix_graph(distance: np.ndarray, k1: int, k2: int, num_queries: int) -> _Graph:
    """The graph of a full [n, n] distance matrix, each row divided by its largest value."""
    scale = _row_scale(distance.max(axis=1))
    return _Graph(
        _neighbour_lists(distance, _list_length(k1, k2)),
        lambda rows, cols: distance[rows, cols] / scale[rows],
        num_queries,
    )


def _check_features(query, gallery, k1, k2, lambda_value) -> Tuple[np.ndarray, np.ndarray]:
    check_parameters(k1, k2, lambda_value)
    query, gallery = np.asarray(query, np.float32), np.asarray(gallery, np.float32)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need query [Q, F] and gallery [G, F] features, got {query.shape} and {gallery.shape}")
    if not (np.isfinite(query).all() and np.isfinite(gallery).all()):
        raise ValueError("features must be finite")
    return query, gallery


def _list_length(k1: int, k2: int) -> int:
    """Neighbour list length the algorithm reads: k1 + 1 for R(p, k1), k2 for the query expansion."""
    return max(k1 + 1, k2)


def _row_scale(row_max: np.ndarray) -> np.ndarray:
    """Each row's divisor: its largest distance, kept above zero so identical features give 0, not NaN."""
    return np.maximum(row_max.astype(np.float64), np.finfo(np.float32).tiny)


def _neighbour_lists(distance: np.ndarray, length: int) -> np.ndarray:
    """Each row's node first, then the ``length - 1`` nearest others in a stable sort's order (ties by id).

    A partition finds each row's cut-off distance, then only the nodes up to it are sorted: the same lists as
    a full stable argsort, at a fraction of its cost on large galleries."""
    lists = np.empty((len(distance), length), np.int64)
    for i, row in enumerate(distance):
        row = row.astype(np.float64)
        row[i] = -np.inf  # self first, whatever ties with it
        cutoff = np.partition(row, length - 1)[length - 1]
        candidates = np.flatnonzero(row <= cutoff)
        lists[i] = candidates[np.argsort(row[candidates], kind="stable")][:length]
    return lists


def _lists_with_query(
    to_query: np.ndarray, gallery_lists: np.ndarray, gallery_list_distance: np.ndarray, length: int
) -> np.ndarray:
    """Neighbour lists of the graph {query} + gallery, the query as node 0 and gallery image j as node j + 1,
    from the gallery's own lists: the query is slotted into each gallery list where its distance puts it."""
    query_list = _neighbour_lists(np.concatenate([[0.0], to_query])[None], length)  # its own row: node 0 is self
    # After self (slot 0), ahead of gallery nodes at an equal distance: node 0 comes first among ties.
    slot = (1 + (gallery_list_distance[:, 1:] < to_query[:, None]).sum(axis=1))[:, None]
    shifted = gallery_lists + 1
    position = np.arange(shifted.shape[1] + 1)
    ahead = shifted[:, np.minimum(position, shifted.shape[1] - 1)]
    behind = shifted[:, np.maximum(position - 1, 0)]  # moved one place back to make room
    lists = np.where(position < slot, ahead, np.where(position == slot, 0, behind))
    return np.concatenate([query_list, lists[:, :length]])


def _distance_with_query(to_query: np.ndarray, gallery_distance: np.ndarray, gallery_max: np.ndarray) -> Distance:
    """Row-normalised distance lookup of the graph {query} + gallery (query = node 0), without building the
    (G + 1)^2 matrix: each row's scale takes the query's distance into account."""
    query_row = np.concatenate([[0.0], to_query])
    scale = _row_scale(np.concatenate([[to_query.max(initial=0.0)], np.maximum(gallery_max, to_query)]))

    def distance(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = np.broadcast_arrays(rows, cols)
        between_gallery = gallery_distance[np.maximum(rows - 1, 0), np.maximum(cols - 1, 0)]
        raw = np.where(rows == 0, query_row[cols], np.where(cols == 0, query_row[rows], between_gallery))
        return raw / scale[rows]

    return distance


# ------------------------------------------------------------------------------------------- the algorithm


def _rerank(graph: _Graph, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """d* [Q, G] of the graph's queries to its gallery nodes."""
    n, q = len(graph.neighbours), graph.num_queries
    jaccard = _jaccard_distance(_encoding(graph, k1, k2), q)[:, q:]
    original = graph.distance(np.arange(q)[:, None], np.arange(q, n)[None, :])
    return (1 - lambda_value) * jaccard + lambda_value * original


def _encoding(graph: _Graph, k1: int, k2: int) -> "_Sparse":
    """V after the local query expansion: each node's weights over its expanded k-reciprocal set."""
    rows, cols = _expanded_sets(graph.neighbours, k1)
    encoding = _Sparse.from_entries(rows, cols, _kernel_weights(rows, cols, graph.distance), len(graph.neighbours))
    return _query_expansion(encoding, graph.neighbours[:, :k2])


def _reciprocal(neighbours: np.ndarray, k: int) -> np.ndarray:
    """Mask [n, k + 1] over N(p, k) (the first k + 1 list entries): True where the member has p in its own
    N(., k), so the masked list is R(p, k)."""
    nearest = neighbours[:, : k + 1]
    return (nearest[nearest] == np.arange(len(neighbours))[:, None, None]).any(axis=2)


def _expanded_sets(neighbours: np.ndarray, k1: int) -> Tuple[np.ndarray, np.ndarray]:
    """R*(p) for every node p, as (p, member) pairs without repeats.

    R(q, k1/2) of a candidate q in R(p, k1) joins when more than 2/3 of it lies in R(p, k1): this brings in
    true matches that R(p, k1) missed (pose, viewpoint) without letting in a neighbour's unrelated neighbours."""
    n, half = len(neighbours), int(np.around(k1 / 2))  # numpy's rounding, as in the authors' code
    owners = np.arange(n)[:, None]
    full_sets = np.where(_reciprocal(neighbours, k1), neighbours[:, : k1 + 1], -1)  # [n, k1 + 1], -1: not in R
    half_sets = np.where(_reciprocal(neighbours, half), neighbours[:, : half + 1], -1)  # [n, half + 1]
    candidate_sets = half_sets[np.maximum(full_sets, 0)]  # R(q, k1/2) of each candidate q: [n, k1 + 1, half + 1]
    # a pair (p, x) as the key p * n + x: "x in R(p, k1)" becomes one sorted search for all p at once
    full_keys = np.sort((owners * n + full_sets)[full_sets >= 0])
    inside = _contains(full_keys, owners[..., None] * n + candidate_sets) & (candidate_sets >= 0)
    sizes = (candidate_sets >= 0).sum(axis=2)
    accepted = (full_sets >= 0) & (inside.sum(axis=2) > EXPANSION_OVERLAP * sizes)
    added = np.where(accepted[..., None], candidate_sets, -1).reshape(n, -1)
    added_keys = (owners * n + added)[added >= 0]
    pairs = np.unique(np.concatenate([full_keys, added_keys]))
    return pairs // n, pairs % n


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is in ``sorted_keys``."""
    found = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[found] == keys


def _kernel_weights(rows: np.ndarray, cols: np.ndarray, distance: Distance) -> np.ndarray:
    """exp(-d(p, g)) for each pair, normalised to sum to 1 per row: near members of R*(p) count more."""
    weights = np.exp(-distance(rows, cols).astype(np.float64))
    return weights / np.bincount(rows, weights)[rows]


def _query_expansion(encoding: "_Sparse", nearest: np.ndarray) -> "_Sparse":
    """V_p replaced by the mean of V over p's k2 first list entries (p and its k2 - 1 nearest)."""
    owners = np.repeat(np.arange(len(nearest)), nearest.shape[1])
    entries, segment = encoding.row_entries(nearest.ravel())
    values = encoding.values[entries] / nearest.shape[1]
    return _Sparse.from_entries(owners[segment], encoding.cols[entries], values, encoding.size)


def _jaccard_distance(encoding: "_Sparse", num_queries: int) -> np.ndarray:
    """d_J [Q, n] of the first ``num_queries`` nodes to every node.

    Inverted index: for query p only the columns where V_p is non-zero can add to sum min(V_p, V_g), so the
    entries of those columns are read (by column) instead of comparing V_p with every row."""
    by_column = encoding.transposed()
    out = np.empty((num_queries, encoding.size))
    for p in range(num_queries):
        own = encoding.row_entries(np.array([p]))[0]
        columns, weights = encoding.cols[own], encoding.values[own]
        entries, segment = by_column.row_entries(columns)
        minima = np.minimum(weights[segment], by_column.values[entries])
        shared = np.bincount(by_column.cols[entries], minima, minlength=encoding.size)
        out[p] = 1 - shared / (2 - shared)
    return out


@dataclass
class _Sparse:
    """A sparse [size, size] matrix as entries sorted by (row, col), with each row's start (CSR)."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    starts: np.ndarray  # [size + 1]: row r's entries are starts[r]:starts[r + 1]
    size: int

    @classmethod
    def from_entries(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, size: int) -> "_Sparse":
        """Entries in any order; repeated (row, col) pairs are summed."""
        keys, inverse = np.unique(rows.astype(np.int64) * size + cols, return_inverse=True)
        summed = np.bincount(inverse.ravel(), values, minlength=len(keys))
        rows, cols = keys // size, keys % size
        return cls(rows, cols, summed, np.searchsorted(rows, np.arange(size + 1)), size)

    def transposed(self) -> "_Sparse":
        return _Sparse.from_entries(self.cols, self.rows, self.values, self.size)

    def row_entries(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Positions of the entries of ``rows`` (repeats allowed), and for each the index into ``rows`` it
        came from."""
        first, counts = self.starts[rows], self.starts[rows + 1] - self.starts[rows]
        segment = np.repeat(np.arange(len(rows)), counts)
        offset_in_segment = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return first[segment] + offset_in_segment, segment
