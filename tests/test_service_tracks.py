"""Queries by a track (several images of one person), group_by=person and batch queries, over HTTP against a
real server with the tiny exported model; the expected answers recomputed locally with ONNX Runtime."""

import asyncio
import io

import numpy as np
import pytest

from client import AsyncReIDClient, ReIDClient
from service.index import VectorIndex
from service.tracks import merge_best
from tests.conftest import image_bytes, person_image
from tests.cluster import BACKENDS, backend_settings
from harness.server import ServiceProcess, query
from tests.server import assert_error, onnx_outputs

pytestmark = pytest.mark.slow
MAX_IMAGES, HEATMAP_MATCHES = 32, 5
BATCH_HEATMAPS = 2 * (1 + HEATMAP_MATCHES) + 3  # two queries in full, the third its own and 2 matches'
# person 1 has many images, so that group_by must widen the index search past them to find other people
VARIANTS = {"1": range(1, 21), "2": range(1, 4), "3": range(1, 4), "4": range(1, 4)}
UNLABELLED = [image_bytes(5, 1), image_bytes(6, 1)]  # no person_id: each is a group of its own


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# a tracker's crops of person 2, not enrolled; one of another size (every image is resized to the model's input)
TRACK = [image_bytes(2, 10), image_bytes(2, 11), png(person_image(2, 12, size=(30, 70)))]


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("tracks") / "gallery.sqlite3"
    with ServiceProcess(
        tiny_model[1],
        store,
        max_images_per_request=MAX_IMAGES,
        max_top_k=40,
        max_heatmap_matches=HEATMAP_MATCHES,
        max_batch_heatmaps=BATCH_HEATMAPS,
        **backend_settings(request),
    ) as process:
        yield process


@pytest.fixture(scope="module")
def reid(server):
    with ReIDClient(server.url) as client:
        yield client


@pytest.fixture(scope="module")
def gallery(reid) -> dict:
    """{id: image bytes} of everything enrolled, in id order."""
    labelled = [(pid, image_bytes(int(pid), v)) for pid, variants in VARIANTS.items() for v in variants]
    items = reid.enroll(
        [blob for _, blob in labelled],
        person_id=[pid for pid, _ in labelled],
        camera_id=[f"c{1 + i % 2}" for i in range(len(labelled))],
    )
    items += reid.enroll(UNLABELLED)
    return dict(zip([i.id for i in items], [blob for _, blob in labelled] + UNLABELLED))


@pytest.fixture(scope="module")
def local(tiny_model, gallery):
    """The model's embeddings of the track and of the gallery, computed here: (track [T, N*D], gallery [G, N*D])."""
    [embedding] = onnx_outputs(tiny_model[1], TRACK + list(gallery.values()), ["embedding"])
    return embedding[: len(TRACK)], embedding[len(TRACK) :]


NUM_BRANCHES = 2  # the tiny model's


def scores(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[Q, N*D] x [G, N*D] -> [Q, G]: the mean over branches of the cosine, the service's score."""
    return np.einsum(
        "qnd,gnd->qgn", queries.reshape(len(queries), NUM_BRANCHES, -1), items.reshape(len(items), NUM_BRANCHES, -1)
    ).mean(-1)


def mean_of(track: np.ndarray) -> np.ndarray:
    branches = track.reshape(len(track), NUM_BRANCHES, -1).mean(axis=0)
    return (branches / np.linalg.norm(branches, axis=1, keepdims=True)).reshape(1, -1)


def assert_explained(result) -> None:
    """Scores descend, and each match's branch scores and heatmap grid (the first ones) average to its score."""
    assert [m.score for m in result.matches] == sorted((m.score for m in result.matches), reverse=True)
    for match in result.matches:
        assert np.mean(match.branch_scores) == pytest.approx(match.score, abs=1e-4)
    drawn = [m for m in result.matches if m.heatmap]
    assert len(drawn) == result.raw["heatmap_matches"] == min(HEATMAP_MATCHES, len(result.matches))
    for match in drawn:
        assert np.mean(match.heatmap["grid"]) == pytest.approx(match.score, abs=1e-4)


def test_a_mean_track_is_searched_and_explained_as_its_aggregate(reid, gallery, local):
    track, stored = local
    aggregate = mean_of(track)
    expected = dict(zip(gallery, scores(aggregate, stored)[0]))
    result = reid.query_track(TRACK, top_k=len(gallery), aggregate="mean")
    assert (result.track_size, result.aggregate, result.query_heatmap) == (3, "mean", None)
    assert sorted(m.id for m in result.matches) == sorted(gallery)
    for match in result.matches:
        assert match.score == pytest.approx(expected[match.id], abs=1e-4) and match.track_image is None
    assert_explained(result)
    # each track image's map, for the aggregate's features: it averages to that image's cosine with the aggregate
    assert [np.mean(h["grid"]) for h in result.track_heatmaps] == pytest.approx(scores(aggregate, track)[0], abs=1e-4)
    assert reid.query_track(TRACK, top_k=3, rerank=True, heatmaps=False).reranked


def test_a_best_of_track_scores_each_item_by_its_best_image(reid, gallery, local):
    track, stored = local
    per_image = dict(zip(gallery, scores(track, stored).T))  # id -> each track image's score
    result = reid.query_track(TRACK, top_k=len(gallery), aggregate="best")
    assert (result.track_size, result.aggregate) == (3, "best")
    for match in result.matches:
        assert match.score == pytest.approx(per_image[match.id].max(), abs=1e-4)
        assert per_image[match.id][match.track_image] == pytest.approx(match.score, abs=1e-4)
    assert_explained(result)
    # best-of explains each image with its own features: R_q^q, which averages to 1
    assert [np.mean(h["grid"]) for h in result.track_heatmaps] == pytest.approx([1.0] * len(TRACK), abs=1e-4)


def test_one_image_answers_exactly_as_before(server):
    with server.client() as client:
        for fields in ({}, {"aggregate": "best"}, {"heatmaps": False, "top_k": 2}):
            body = query(client, TRACK[0], **{"top_k": 3, **fields}).json()
            assert set(body) == {
                "matches",
                "query_heatmap",
                "reranked",
                "heatmap_matches",
                "same_person_threshold",
                "gallery_size",
                "timing_ms",
            }
            assert all("track_image" not in m for m in body["matches"]) and (body["query_heatmap"] is None) == (
                fields.get("heatmaps") is False
            )


def first_per_person(matches) -> list:
    seen, kept = set(), []
    for match in matches:
        key = match.person_id or f"item {match.id}"
        if key not in seen:
            seen.add(key)
            kept.append(match.id)
    return kept


@pytest.mark.parametrize("kind", ["image", "mean", "best"])
def test_group_by_person_keeps_each_persons_best_match_in_order(reid, gallery, kind):
    def ask(**options):
        if kind == "image":
            return reid.query(image_bytes(1, 30), heatmaps=False, **options)
        return reid.query_track(TRACK, aggregate=kind, heatmaps=False, **options)

    expected = first_per_person(ask(top_k=len(gallery)).matches)
    assert len(expected) == len(VARIANTS) + len(UNLABELLED)
    grouped = ask(top_k=len(expected), group_by="person")
    assert [m.id for m in grouped.matches] == expected
    persons = [m.person_id for m in grouped.matches if m.person_id]
    assert sorted(persons) == sorted(VARIANTS)
    assert [m.id for m in ask(top_k=2, group_by="person").matches] == expected[:2]


def test_a_batch_answers_each_image_as_its_own_query(reid, gallery):
    images = TRACK + [next(iter(gallery.values()))]
    options = dict(top_k=6, exclude_camera_id="c1", group_by="person")
    batch = reid.query_batch(images, **options)
    assert len(batch.results) == len(images) and set(batch.timing_ms) == {"embed", "total"}
    for image, result in zip(images, batch.results):
        single = reid.query(image, heatmaps=False, **options)
        assert [m.id for m in result.matches] == [m.id for m in single.matches]
        assert [m.score for m in result.matches] == pytest.approx([m.score for m in single.matches], abs=1e-5)
        assert result.query_heatmap is None and result.raw["heatmap_matches"] == 0 and result.track_size is None
    drawn = reid.query_batch(images[:2], top_k=7, heatmaps=True)
    for result in drawn.results:
        assert_explained(result)
        assert np.mean(result.query_heatmap["grid"]) == pytest.approx(1.0, abs=1e-4)


def test_a_batch_draws_at_most_its_heatmap_budget(reid, gallery):
    """64 queries with heatmaps and top_k=100 answered 120 MB in 22 s: a batch draws REID_MAX_BATCH_HEATMAPS
    in all, in upload order, and each result says how many matches it drew."""
    results = reid.query_batch(TRACK + TRACK, top_k=7, heatmaps=True).results
    assert [r.raw["heatmap_matches"] for r in results] == [HEATMAP_MATCHES, HEATMAP_MATCHES, 2, 0, 0, 0]
    assert [r.query_heatmap is not None for r in results] == [True, True, True, False, False, False]
    assert sum(1 + r.raw["heatmap_matches"] for r in results if r.query_heatmap) == BATCH_HEATMAPS
    assert all(m.heatmap for m in results[2].matches[:2]) and not any(m.heatmap for m in results[2].matches[2:])


def test_the_async_client_queries_tracks_and_batches(server, reid, gallery):
    async def run():
        async with AsyncReIDClient(server.url) as client:
            return await asyncio.gather(
                client.query_track(TRACK, top_k=3, aggregate="best", heatmaps=False), client.query_batch(TRACK, top_k=3)
            )

    track, batch = asyncio.run(run())
    assert [m.id for m in track.matches] == [
        m.id for m in reid.query_track(TRACK, top_k=3, aggregate="best", heatmaps=False).matches
    ]
    assert [[m.id for m in r.matches] for r in batch.results] == [
        [m.id for m in reid.query(i, top_k=3, heatmaps=False).matches] for i in TRACK
    ]


def parts(name: str, blobs) -> list:
    return [(name, (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]


TOO_MANY = [image_bytes(7, 1)] * (MAX_IMAGES + 1)
BAD_REQUESTS = {
    "a track over REID_MAX_IMAGES_PER_REQUEST": ("/query", parts("image", TOO_MANY), {}, 413, "too_many_images"),
    "a batch over REID_MAX_IMAGES_PER_REQUEST": ("/query/batch", parts("images", TOO_MANY), {}, 413, "too_many_images"),
    "an unknown aggregate": ("/query", parts("image", TRACK), {"aggregate": "median"}, 422, "invalid_request"),
    "an unknown group_by": ("/query", parts("image", TRACK[:1]), {"group_by": "camera"}, 422, "invalid_request"),
    "group_by with rerank": (
        "/query",
        parts("image", TRACK[:1]),
        {"group_by": "person", "rerank": "true"},
        422,
        "invalid_request",
    ),
    "group_by with rerank, batched": (
        "/query/batch",
        parts("images", TRACK),
        {"group_by": "person", "rerank": "true"},
        422,
        "invalid_request",
    ),
    "group_by with pair_attention": (
        "/query",
        parts("image", TRACK[:1]),
        {"group_by": "person", "pair_attention": "true"},
        422,
        "invalid_request",
    ),
    "pair_attention for a track": ("/query", parts("image", TRACK), {"pair_attention": "true"}, 422, "invalid_request"),
    "rerank of a best-of track": (
        "/query",
        parts("image", TRACK),
        {"aggregate": "best", "rerank": "true"},
        422,
        "invalid_request",
    ),
    "a track with a broken image": ("/query", parts("image", [TRACK[0], b"not an image"]), {}, 400, "invalid_image"),
    "a batch without images": ("/query/batch", [], {"top_k": "3"}, 422, "invalid_request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_track_and_batch_requests_get_the_error_shape(server, gallery, case):
    path, files, data, status, code = BAD_REQUESTS[case]
    with server.client() as client:
        assert_error(client.post(path, files=files or None, data=data), status, code)


def test_grouped_index_search_widens_past_one_persons_many_hits():
    index = VectorIndex(2, device="cpu")
    vectors = np.array([[1.0, 0.01 * i] for i in range(40)] + [[0.0, 1.0], [-1.0, 0.0]], np.float32)
    index.add(np.arange(1, 43), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    group = {i: "many" for i in range(1, 41)} | {41: "b", 42: "c"}
    hits = index.search(np.array([1.0, 0.0], np.float32), 3, group=group.get)  # the first 19 candidates are all "many"
    assert [i for i, _ in hits] == [1, 41, 42] and [s for _, s in hits] == pytest.approx([1.0, 0.0, -1.0], abs=1e-6)


def test_best_of_merge_takes_each_items_best_image_and_groups_after():
    searches = [[(1, 0.9), (2, 0.5), (3, 0.4)], [(2, 0.95), (3, 0.3), (4, 0.2)]]
    assert merge_best(searches, 3) == ([(2, 0.95), (1, 0.9), (3, 0.4)], {2: 1, 1: 0, 3: 0})
    assert merge_best(searches, 2, group={1: "a", 2: "a", 3: "b", 4: "c"}.get) == ([(2, 0.95), (3, 0.4)], {2: 1, 3: 0})
