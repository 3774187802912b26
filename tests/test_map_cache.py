"""The heatmaps' feature-map cache (service.map_cache): least recently used out first under a byte budget,
float16 inside and float32 out, and a discard that really frees the memory."""

import numpy as np

from service.inference import ImageMaps
from service.map_cache import FeatureMapCache


def maps(seed: int) -> ImageMaps:
    return ImageMaps(np.random.default_rng(seed).normal(size=(2, 16, 4, 2)).astype(np.float32))  # 512 bytes in float16


def test_the_least_recently_used_maps_leave_first_when_the_budget_is_passed():
    cache = FeatureMapCache(budget_bytes=3 * 512)
    cache.put({1: maps(1), 2: maps(2), 3: maps(3)})
    assert set(cache.get([1])) == {1}  # 1 is now the most recently used
    cache.put({4: maps(4)})
    assert set(cache.get([1, 2, 3, 4])) == {1, 3, 4} and cache.bytes == 3 * 512 and len(cache) == 3


def test_maps_come_back_in_float32_within_float16_rounding():
    cache = FeatureMapCache(budget_bytes=10_000)
    original = maps(7)
    cache.put({7: original})
    back = cache.get([7])[7].features
    assert back.dtype == np.float32 and np.abs(back - original.features).max() <= 2e-3 * np.abs(original.features).max()


def test_discard_frees_the_bytes_and_putting_an_id_again_replaces_it():
    cache = FeatureMapCache(budget_bytes=10_000)
    cache.put({1: maps(1), 2: maps(2)})
    cache.put({1: maps(9)})
    assert cache.bytes == 2 * 512 and np.allclose(cache.get([1])[1].features, maps(9).features, atol=1e-2)
    cache.discard([1, 5])
    assert cache.bytes == 512 and set(cache.get([1, 2])) == {2}


def test_a_zero_budget_keeps_nothing():
    cache = FeatureMapCache(budget_bytes=0)
    cache.put({1: maps(1)})
    assert len(cache) == 0 and cache.bytes == 0
