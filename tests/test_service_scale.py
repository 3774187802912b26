"""Galleries too large for full embeddings in memory: the reduced index (service.index, REID_INDEX_REDUCE_DIM)
finds what exact search finds and answers exact scores, in units and over HTTP on a real server."""

import numpy as np
import pytest

from service.index import VectorIndex, uncentred_pca
from service.store import FINGERPRINT_KEY, GalleryStore, NewItem
from tests.conftest import image_bytes
from harness.server import ServiceProcess


def low_rank_rows(n: int, dim: int, rank: int, seed: int = 0) -> np.ndarray:
    """Unit rows that mostly live in a ``rank``-dimensional subspace, as real embeddings do."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, dim))
    rows = rng.normal(size=(n, rank)) @ basis + 0.05 * rng.normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def exact_scorer(vectors: np.ndarray, query: np.ndarray, first_id: int = 0):
    return lambda ids: vectors[ids - first_id] @ query


def test_the_uncentred_pca_keeps_inner_products_of_vectors_in_its_span():
    vectors = low_rank_rows(500, 32, 6)
    axes = uncentred_pca(vectors, 8)
    assert axes.shape == (32, 8) and np.allclose(axes.T @ axes, np.eye(8), atol=1e-5)
    projected = vectors @ axes
    assert np.abs(projected @ projected.T - vectors @ vectors.T).max() < 0.02


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_reduced_index_finds_the_exact_top_10_and_answers_exact_scores(kind):
    vectors = low_rank_rows(3000, 64, 12)
    index = VectorIndex(64, kind, "cpu", ivf_nlist=32, ivf_nprobe=8, reduce_dim=16, rescore_candidates=50)
    index.rebuild([(np.arange(3000), vectors)])
    assert index.rescores and index.index.d == 16
    queries = low_rank_rows(40, 64, 12, seed=0)[:40] + 0.02 * low_rank_rows(40, 64, 12, seed=1)
    recalls = []
    for query in queries:
        hits = index.search(query, 10, exact=exact_scorer(vectors, query))
        truth = np.argsort(-(vectors @ query))[:10]
        recalls.append(len(set(truth.tolist()) & {i for i, _ in hits}) / 10)
        assert [s for _, s in hits] == pytest.approx((vectors[[i for i, _ in hits]] @ query).tolist(), abs=1e-6)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert np.mean(recalls) >= 0.9


def test_a_reduced_index_starts_exact_trains_once_large_and_needs_the_exact_scorer():
    vectors = low_rank_rows(1200, 32, 6)
    index = VectorIndex(32, "flat", "cpu", reduce_dim=8)
    index.rebuild([(np.arange(999), vectors[:999])])
    assert not index.rescores and index.search(vectors[3], 1)[0][0] == 3  # small: full vectors, exact
    index.add(np.arange(999, 1200), vectors[999:])
    assert index.needs_rebuild
    index.rebuild([(np.arange(1200), vectors)], training=vectors[:1000])  # a sample of the gallery teaches the axes
    assert index.rescores and not index.needs_rebuild
    with pytest.raises(ValueError, match="exact scorer"):
        index.search(vectors[3], 1)
    gone = lambda ids: np.where(ids == 3, np.nan, vectors[ids] @ vectors[3])  # noqa: E731  id 3 left the store
    assert 3 not in [i for i, _ in index.search(vectors[3], 5, exact=gone)]


def test_an_auto_index_is_exact_while_small_and_becomes_hnsw_once_a_scan_is_long(monkeypatch, tmp_path):
    """Kind "auto" (the default): exact while a scan is short, HNSW on the CPU from the rebuild after it grows
    long (here the threshold is lowered to 1,100 32-d items); the gallery's rebuild tells it the size it is
    building. HNSW learns nothing from the gallery, so growing further needs no rebuild."""
    import service.index
    from service.gallery import built_index

    monkeypatch.setattr(service.index, "AUTO_LARGE_FLOATS", 1100 * 32)
    vectors = low_rank_rows(1200, 32, 6)
    store = GalleryStore(tmp_path / "g.sqlite3")
    store.add([NewItem(b"jpeg", "JPEG", 1, 1, v) for v in vectors[:1000]])
    index, _ = built_index(VectorIndex(32, "auto", "cpu", ivf_nlist=16, ivf_nprobe=16), store, 32)
    assert index.built_kind == "flat" and index.lists is None and not index.needs_rebuild
    added = store.add([NewItem(b"jpeg", "JPEG", 1, 1, v) for v in vectors[1000:]])
    index.add(np.array([i.id for i in added], np.int64), vectors[1000:])
    assert index.needs_rebuild
    index, _ = built_index(VectorIndex(32, "auto", "cpu"), store, 32)
    assert index.built_kind == "hnsw" and index.size == 1200 and not index.needs_rebuild
    assert index.search(vectors[3], 1)[0][0] == 4  # ids start at 1
    index.add(np.arange(2000, 7000), low_rank_rows(5000, 32, 6, seed=1))
    assert not index.needs_rebuild
    store.close()


def test_a_server_with_a_reduced_index_answers_exact_scores_and_heatmaps(tiny_model, tmp_path):
    from model_zoo.preprocess import load_for_model
    from service.inference import InferenceModel

    model = InferenceModel(tiny_model[1], "cpu").load()
    blobs = [image_bytes(pid, variant) for pid in range(4000, 4300) for variant in range(4)]  # 1200 people's sightings
    pixels = np.stack([load_for_model(blob, *model.input_size) for blob in blobs])
    store = GalleryStore(tmp_path / "g.sqlite3")
    store.set_meta({FINGERPRINT_KEY: model.fingerprint, "embedding_dim": str(model.contract.embedding_dim)})
    store.add(
        [
            NewItem(blob, "JPEG", 20, 40, v, camera_id="filler")
            for blob, v in zip(blobs, model.predict(pixels, with_maps=False)[0])
        ]
    )
    store.close()
    with (
        ServiceProcess(
            tiny_model[1], tmp_path / "g.sqlite3", index_type="ivf", index_reduce_dim=8, ivf_nlist=16, ivf_nprobe=4
        ) as server,
        server.client() as client,
    ):
        assert client.get("/readyz").json()["index"]["reduced_dim"] == 8
        enrolled = client.post(
            "/gallery",
            files=[("images", (f"{v}.jpg", image_bytes(3000, v))) for v in range(3)],
            data={"person_id": "3000"},
        ).json()["ids"]
        body = client.post("/query", files={"image": ("q.jpg", image_bytes(3000, 0))}, data={"top_k": "5"}).json()
    first = body["matches"][0]
    assert (
        body["gallery_size"] == 1203 and first["id"] == enrolled[0] and first["score"] == pytest.approx(1.0, abs=1e-5)
    )
    for match in body["matches"]:
        assert np.mean(match["branch_scores"]) == pytest.approx(match["score"], abs=1e-5)
        assert np.array(match["heatmap"]["grid"]).mean() == pytest.approx(match["score"], abs=1e-4)
