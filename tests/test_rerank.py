"""k-reciprocal re-ranking (model_zoo.rerank): hand-worked cases, a brute-force transcription of the paper, and
the properties the evaluation and the service rely on."""

import numpy as np
import pytest

from model_zoo.rerank import (
    rerank_all_queries,
    rerank_distance_matrix,
    rerank_one_query_at_a_time,
    rerank_shortlist,
    squared_distances,
)


def brute_force(query, gallery, k1=20, k2=6, lambda_value=0.3):
    """The paper's steps written out with Python sets and dense matrices, for small graphs only."""
    x = np.concatenate([query, gallery]).astype(np.float64)
    n, num_queries = len(x), len(query)
    k1, k2 = min(k1, n - 1), min(k2, n)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d = d / np.maximum(d.max(axis=1, keepdims=True), 1e-300)
    ranking = []
    for i in range(n):
        key = d[i].copy()
        key[i] = -np.inf  # each node first in its own list
        ranking.append(list(np.argsort(key, kind="stable")))

    def reciprocal(p, k):
        return {j for j in ranking[p][: k + 1] if p in ranking[j][: k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        expanded = set(r)
        for candidate in r:
            half = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(half & r) > 2 / 3 * len(half):
                expanded |= half
        members = sorted(expanded)
        weights = np.exp(-d[p, members])
        v[p, members] = weights / weights.sum()
    v = np.stack([v[ranking[p][:k2]].mean(axis=0) for p in range(n)])
    jaccard = np.array(
        [
            [1 - np.minimum(v[p], v[j]).sum() / np.maximum(v[p], v[j]).sum() for j in range(n)]
            for p in range(num_queries)
        ]
    )
    return ((1 - lambda_value) * jaccard + lambda_value * d[:num_queries])[:, num_queries:]


def random_features(seed, count, dim=8):
    return np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)


def test_jaccard_distance_worked_by_hand():
    # Points on a line: q = 0, g0 = 1, g1 = 5, g2 = 6 (squared distances q-g0 1, g1-g2 1, q-g1 25, q-g2 36,
    # g0-g1 16, g0-g2 25). With k1 = 1 every node's list is itself and its nearest, and the nearest pairs are
    # mutual: R(q) = {q, g0}, R(g0) = {g0, q}, R(g1) = {g1, g2}; the k1/2 = 0 expansion adds nothing, k2 = 1
    # skips the query expansion. Rows are divided by their largest distance: 36 for q, 25 for g0.
    query, gallery = np.array([[0.0]]), np.array([[1.0], [5.0], [6.0]])
    a, b = np.exp(-1 / 36), np.exp(-1 / 25)
    v_q = {"q": 1 / (1 + a), "g0": a / (1 + a)}  # Gaussian kernel weights exp(-d), summing to 1
    v_g0 = {"q": b / (1 + b), "g0": 1 / (1 + b)}
    shared = min(v_q["q"], v_g0["q"]) + min(v_q["g0"], v_g0["g0"])
    jaccard_g0 = 1 - shared / (2 - shared)  # sum max = 2 - sum min, as both rows sum to 1
    expected_jaccard = np.array([jaccard_g0, 1.0, 1.0])  # g1 and g2 share no neighbour with q
    np.testing.assert_allclose(
        rerank_all_queries(query, gallery, k1=1, k2=1, lambda_value=0)[0], expected_jaccard, atol=1e-6
    )
    original = np.array([1, 25, 36]) / 36
    np.testing.assert_allclose(
        rerank_all_queries(query, gallery, k1=1, k2=1, lambda_value=0.5)[0],
        0.5 * expected_jaccard + 0.5 * original,
        atol=1e-6,
    )


def two_clusters():
    """A query in cluster A whose plain nearest neighbours include a hard negative from cluster B: the
    negative (squared distance 1.44) beats the farthest true match (2.25)."""
    query = np.array([[0.0, 0.0]])
    matches = np.array([[-1, 0], [0, 1], [0, -1], [-0.7, 0.7], [-0.7, -0.7], [-1.5, 0]])
    others = np.array([[1.2, 0], [2.0, 0], [2.2, 0.5], [2.2, -0.5], [2.7, 0]])
    return query, np.concatenate([matches, others]), len(matches)


def test_re_ranking_puts_every_true_match_above_a_hard_negative():
    query, gallery, num_matches = two_clusters()
    plain = np.argsort(squared_distances(query, gallery)[0], kind="stable")
    assert set(plain[:num_matches]) != set(range(num_matches))  # plain distance ranks the negative 6th
    reranked = np.argsort(rerank_all_queries(query, gallery, k1=4, k2=2)[0], kind="stable")
    assert set(reranked[:num_matches]) == set(range(num_matches))


@pytest.mark.parametrize("k1, k2", [(20, 6), (5, 3), (3, 1), (1, 1), (40, 50)])
def test_all_queries_equals_the_papers_steps_written_out(k1, k2):
    query, gallery = random_features(1, 4), random_features(2, 25)
    np.testing.assert_allclose(
        rerank_all_queries(query, gallery, k1, k2), brute_force(query, gallery, k1, k2), atol=1e-5
    )


def test_lambda_one_is_the_original_distance_and_its_order():
    query, gallery = random_features(3, 5), random_features(4, 30)
    plain = squared_distances(query, gallery)
    reranked = rerank_all_queries(query, gallery, lambda_value=1.0)
    np.testing.assert_array_equal(np.argsort(reranked, axis=1, kind="stable"), np.argsort(plain, axis=1, kind="stable"))
    # each row divided by its largest distance in the graph (the queries' too)
    graph = squared_distances(query, np.concatenate([query, gallery]))
    np.testing.assert_allclose(reranked, plain / graph.max(axis=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("k1, k2, gallery_size", [(20, 6, 30), (4, 2, 30), (20, 6, 12), (5, 7, 5), (3, 2, 1)])
def test_one_query_at_a_time_equals_all_queries_with_one_query(k1, k2, gallery_size):
    query, gallery = random_features(5, 6), random_features(6, gallery_size)
    alone = np.concatenate([rerank_all_queries(query[i : i + 1], gallery, k1, k2) for i in range(len(query))])
    np.testing.assert_allclose(rerank_one_query_at_a_time(query, gallery, k1, k2), alone, atol=1e-6)


def test_queries_in_one_graph_are_each_others_neighbours():
    query, gallery = random_features(5, 6), random_features(6, 30)
    together, alone = rerank_all_queries(query, gallery), rerank_one_query_at_a_time(query, gallery)
    assert np.abs(together - alone).max() > 1e-3


def test_shapes_and_the_order_of_inputs():
    query, gallery = random_features(7, 3), random_features(8, 20)
    for rerank in (rerank_all_queries, rerank_one_query_at_a_time):
        result = rerank(query, gallery, k1=6, k2=3)
        assert (
            result.shape == (3, 20) and np.isfinite(result).all() and (result >= 0).all() and (result <= 1 + 1e-9).all()
        )
        # shuffling the gallery shuffles the columns, shuffling the queries the rows: nothing depends on order
        permutation = np.random.default_rng(0).permutation(20)
        np.testing.assert_allclose(rerank(query, gallery[permutation], k1=6, k2=3), result[:, permutation], atol=1e-6)
        np.testing.assert_allclose(rerank(query[::-1], gallery, k1=6, k2=3), result[::-1], atol=1e-6)
    assert rerank_all_queries(query[:0], gallery).shape == (0, 20)
    assert rerank_one_query_at_a_time(query, gallery[:0]).shape == (3, 0)


def test_a_distance_matrix_gives_what_the_features_give():
    query, gallery = random_features(9, 2), random_features(10, 15)
    nodes = np.concatenate([query, gallery]).astype(np.float64)
    distance = ((nodes[:, None] - nodes[None]) ** 2).sum(-1)
    np.testing.assert_allclose(
        rerank_distance_matrix(distance, 2, k1=5, k2=3), rerank_all_queries(query, gallery, k1=5, k2=3), atol=1e-5
    )


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_a_shortlist_smaller_than_k1_clamps_k1_and_k2(size):
    query, shortlist = random_features(11, 1)[0], random_features(12, size)
    distances, order = rerank_shortlist(query, shortlist, k1=20, k2=6)
    assert distances.shape == order.shape == (size,) and np.isfinite(distances).all()
    assert sorted(order) == list(range(size)) and (np.diff(distances[order]) >= 0).all()
    # k1 = S and k2 = min(6, S + 1): the graph has S + 1 nodes
    clamped = rerank_all_queries(query[None], shortlist, k1=max(size, 1), k2=min(6, size + 1))[0]
    np.testing.assert_allclose(distances, clamped, atol=1e-9)


def test_the_shortlist_function_is_one_query_of_the_graph():
    query, gallery = two_clusters()[:2]
    distances, order = rerank_shortlist(query[0], gallery, k1=4, k2=2)
    np.testing.assert_allclose(distances, rerank_all_queries(query, gallery, k1=4, k2=2)[0])
    assert list(order) == list(np.argsort(distances, kind="stable"))


def test_duplicates_and_identical_features_give_no_nan():
    gallery = np.repeat(random_features(13, 3), 10, axis=0)  # three vectors, ten copies each
    query = gallery[[0, 15]]
    for rerank in (rerank_all_queries, rerank_one_query_at_a_time):
        result = rerank(query, gallery, k1=4, k2=3)
        assert np.isfinite(result).all()
        assert result[0, :10].max() < result[0, 10:].min()  # the query's own copies come first
    identical = np.ones((4, 8))
    assert np.isfinite(rerank_all_queries(identical[:1], identical)).all()
    _, order = rerank_shortlist(identical[0], identical)
    assert sorted(order) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "k1, k2, lambda_value",
    [(0, 6, 0.3), (20, 0, 0.3), (2.5, 6, 0.3), (20, 6, -0.1), (20, 6, 1.5), (20, 6, float("nan"))],
)
def test_bad_parameters_are_refused(k1, k2, lambda_value):
    with pytest.raises(ValueError):
        rerank_all_queries(random_features(0, 1), random_features(1, 3), k1, k2, lambda_value)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        rerank_all_queries(random_features(0, 2, dim=4), random_features(1, 3, dim=5))
    with pytest.raises(ValueError):
        rerank_shortlist(random_features(0, 2), random_features(1, 3))
    with pytest.raises(ValueError):
        rerank_all_queries(np.full((1, 8), np.nan), random_features(1, 3))
