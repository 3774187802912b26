import numpy as np
import pytest

from model_zoo.contract import split_branches
from model_zoo.ram import ranking_activation_maps


def unit_features(maps: np.ndarray) -> np.ndarray:
    gap = maps.mean(axis=(-2, -1))
    return gap / np.linalg.norm(gap, axis=-1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_aggregate_ram_mean_equals_the_retrieval_score(seed):
    rng = np.random.default_rng(seed)
    branches, dim, h, w = 3, 16, 4, 2
    query_maps = rng.normal(size=(branches, dim, h, w)).astype(np.float32)
    gallery_maps = rng.normal(size=(branches, dim, h, w)).astype(np.float32)
    query_embedding = unit_features(query_maps).reshape(-1)
    gallery_embedding = unit_features(gallery_maps).reshape(-1)
    score = float(query_embedding @ gallery_embedding) / branches
    ram = ranking_activation_maps(split_branches(query_embedding, branches), gallery_maps)
    assert ram.per_branch.shape == (branches, h, w) and ram.aggregate.shape == (h, w)
    assert ram.score == pytest.approx(score, abs=1e-6)
    per_branch_cosines = (unit_features(query_maps) * unit_features(gallery_maps)).sum(axis=1)
    np.testing.assert_allclose(ram.per_branch.mean(axis=(1, 2)), per_branch_cosines, atol=1e-6)


def test_the_query_own_map_averages_to_one():
    maps = np.random.default_rng(0).normal(size=(2, 8, 4, 2))
    ram = ranking_activation_maps(unit_features(maps), maps)
    assert ram.score == pytest.approx(1.0)
