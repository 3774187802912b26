"""Feature maps stored at enrolment (service.stored_maps): int8 cells with exact channel means, so a RAM grid's
mean (the score) survives the round trip exactly and each cell moves by at most half a quantisation step."""

from types import SimpleNamespace

import numpy as np
import pytest

from model_zoo.ram import ranking_activation_maps
from service.inference import ImageMaps
from service.stored_maps import MapStorage, pack, packed_bytes, unpack


def feature_maps(seed: int, batch: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, 2, 16, 4, 2)) + rng.normal(size=(batch, 2, 16, 1, 1))).astype(np.float32)


def test_a_round_trip_keeps_shape_channel_means_and_each_cell_within_half_a_step():
    features = feature_maps(0)
    blobs = pack(features)
    assert [len(b) for b in blobs] == [packed_bytes(features.shape[1:])] * 3
    for original, blob in zip(features, blobs):
        back = unpack(blob)
        assert back.shape == original.shape and back.dtype == np.float32
        assert np.abs(back.mean(axis=(2, 3)) - original.mean(axis=(2, 3))).max() < 1e-6
        residual = original - original.mean(axis=(2, 3), keepdims=True)
        half_step = np.abs(residual).max(axis=(2, 3), keepdims=True) / 127 / 2
        # the re-centring after rounding may add up to another half step
        assert np.all(np.abs(back - original) <= 2 * half_step + 1e-6)


def test_a_ram_grid_from_stored_maps_averages_to_the_same_score():
    features = feature_maps(1, batch=1)[0]
    query = np.random.default_rng(2).normal(size=(2, 16))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    exact = ranking_activation_maps(query, features)
    stored = ranking_activation_maps(query, unpack(pack(features[None])[0]))
    assert stored.score == pytest.approx(exact.score, abs=1e-6)
    assert np.abs(stored.aggregate - exact.aggregate).max() < 0.02 * np.ptp(exact.aggregate)


def test_a_constant_channel_and_an_unknown_format_version():
    features = feature_maps(3, batch=1)
    features[0, 1, 5] = 0.25
    back = unpack(pack(features)[0])
    assert np.all(np.isfinite(back)) and np.allclose(back[1, 5], 0.25)
    newer = bytearray(pack(features)[0])
    newer[0] = 99
    assert unpack(bytes(newer)) is None


def model_like(optional_maps=None, branches=2, dim=16, height=4, width=2):
    contract = SimpleNamespace(num_branches=branches, branch_dim=dim, map_height=height, map_width=width)
    return SimpleNamespace(contract=contract, optional_maps=optional_maps or {})


def test_maps_are_stored_only_under_the_size_limit_and_without_maps_they_cannot_hold():
    assert MapStorage(model_like(), max_kb=1).enabled  # 522 bytes an item
    assert not MapStorage(model_like(), max_kb=0).enabled
    assert not MapStorage(model_like(branches=3, dim=1280, height=16, width=8), max_kb=64).enabled  # 3-branch CAMA
    assert MapStorage(model_like(branches=1, dim=256, height=16, width=8), max_kb=64).item_bytes == 34_826
    assert not MapStorage(model_like({"pair": "pair_maps"}), max_kb=64).enabled
    storage = MapStorage(model_like(), max_kb=1)
    assert storage.packed(None, 2) == [None, None]
    assert [len(b) for b in storage.packed(ImageMaps(feature_maps(4, batch=2)), 2)] == [522, 522]
    assert not MapStorage(model_like(), max_kb=0).packed(ImageMaps(feature_maps(4, batch=2)), 2)[0]
