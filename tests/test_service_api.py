"""The service over HTTP: a real uvicorn process on loopback, the tiny exported model, a real SQLite file, and the
same suite again on the cluster backend (a real PostgreSQL server and milvus-lite)."""

import contextlib
import io
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from service.inference import cpu_cores
from service.settings import Settings
from tests.conftest import image_bytes
from tests.cluster import BACKENDS, backend_settings, stored_embeddings, stored_maps
from harness.server import REPO, ServiceProcess, metric
from tests.server import assert_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tiny_model, tmp_path_factory):
    """The suite runs once per gallery backend: SQLite + FAISS, then PostgreSQL + Milvus (milvus-lite)."""
    backend = backend_settings(request)
    store = tmp_path_factory.mktemp("store") / "gallery.sqlite3"
    with ServiceProcess(
        tiny_model[1],
        store,
        max_image_bytes=300_000,
        max_images_per_request=8,
        max_top_k=20,
        rerank_shortlist=8,
        **backend,
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module", params=BACKENDS)
def client_without_stored_maps(request, tiny_model, tmp_path_factory):
    """A server that stores no feature maps (REID_STORED_MAPS_MAX_KB=0): its heatmaps re-embed their matches."""
    store = tmp_path_factory.mktemp("store") / "gallery.sqlite3"
    with ServiceProcess(tiny_model[1], store, stored_maps_max_kb=0, **backend_settings(request)) as process:
        with process.client() as c:
            yield c


def files(*blobs, name="images"):
    return [(name, (f"img{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]


def enroll(client, blobs, **data):
    response = client.post("/gallery", files=files(*blobs), data=data)
    assert response.status_code == 201, response.text
    return response.json()["ids"]


def gallery_total(client) -> int:
    return client.get("/gallery").json()["total"]


def test_query_on_an_empty_gallery_is_a_clear_409(client):
    assert_error(client.post("/query", files=files(image_bytes(1, 1), name="image")), 409, "gallery_empty")


def test_health_ready_and_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["provider"]["active"] == "CPUExecutionProvider" and ready["provider"]["fell_back"] is False
    # the test server pins one ONNX Runtime thread per call; the instances are the CPU plan's, one per core
    assert (ready["provider"]["instances"], ready["provider"]["intra_op_threads"]) == (cpu_cores(), 1)
    model = client.get("/model").json()
    assert (model["architecture"], model["num_branches"], model["branch_dim"], model["embedding_dim"]) == (
        "cama",
        2,
        16,
        32,
    )


def test_enroll_one_and_many_with_ids_and_metadata(client):
    [single] = enroll(client, [image_bytes(1000, 1)], person_id="p1000", camera_id="cam1", metadata='{"site": "north"}')
    item = client.get(f"/gallery/{single}").json()
    assert (item["person_id"], item["camera_id"], item["metadata"], item["image_format"]) == (
        "p1000",
        "cam1",
        {"site": "north"},
        "JPEG",
    )
    response = client.post(
        "/gallery",
        files=files(image_bytes(1001, 2), image_bytes(1001, 3, "PNG")),
        data={"person_id": ["a", "b"], "camera_id": "cam2"},
    )
    assert response.status_code == 201
    ids = response.json()["ids"]
    assert [client.get(f"/gallery/{i}").json()["person_id"] for i in ids] == ["a", "b"]
    assert client.get(f"/gallery/{ids[1]}/image").content == image_bytes(1001, 3, "PNG")


def truncated_jpeg() -> bytes:
    return image_bytes(5, 5)[:200]


def decompression_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(side=400) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    "blob, status, code",
    [
        (b"this is not an image", 400, "invalid_image"),
        (b"", 400, "invalid_image"),
        (truncated_jpeg(), 400, "invalid_image"),
        (decompression_bomb(), 413, "image_too_large"),
        (noise_png(), 413, "image_too_large"),
    ],
)
def test_bad_images_are_refused_and_a_batch_is_all_or_nothing(client, blob, status, code):
    before = gallery_total(client)
    assert_error(client.post("/gallery", files=files(image_bytes(7, 1), blob)), status, code)
    assert_error(client.post("/query", files=files(blob, name="image")), status, code)
    assert gallery_total(client) == before


@pytest.mark.parametrize(
    "data, code",
    [
        ({"metadata": "{not json"}, "invalid_metadata"),
        ({"metadata": "[1, 2]"}, "invalid_metadata"),
        (
            {"metadata": '{"site": "a", "site": "b"}'},
            "invalid_metadata",
        ),  # a repeated key would be stored as one, silently
        ({"metadata": '{"camera": {"x": 1, "x": 1}}'}, "invalid_metadata"),
        ({"person_id": ["a", "b", "c"]}, "invalid_request"),
        ({"camera_id": "x" * 200}, "invalid_request"),
    ],
)
def test_malformed_fields_are_refused(client, data, code):
    before = gallery_total(client)
    assert_error(client.post("/gallery", files=files(image_bytes(8, 1), image_bytes(8, 2)), data=data), 422, code)
    assert gallery_total(client) == before


def test_too_many_images_and_missing_parts(client):
    assert_error(client.post("/gallery", files=files(*[image_bytes(9, i) for i in range(9)])), 413, "too_many_images")
    assert_error(client.post("/gallery", data={"person_id": "x"}), 422, "invalid_request")
    assert_error(client.post("/query", data={"top_k": "3"}), 422, "invalid_request")


def test_unknown_ids_and_routes(client):
    for response in (
        client.get("/gallery/999999"),
        client.get("/gallery/999999/image"),
        client.delete("/gallery/999999"),
    ):
        assert_error(response, 404, "not_found")
    assert_error(client.get("/gallery/abc"), 422, "invalid_request")
    assert_error(client.get("/nowhere"), 404, "not_found")


@pytest.mark.parametrize("top_k", ["0", "21", "-3", "many"])
def test_top_k_out_of_range(client, top_k):
    assert_error(
        client.post("/query", files=files(image_bytes(1, 1), name="image"), data={"top_k": top_k}),
        422,
        "invalid_request",
    )


def test_query_ranks_the_same_image_first_with_consistent_scores_and_heatmaps(client):
    # The tiny model barely trained, so only an identical image is sure to rank first (score 1).
    for pid in (2000, 2001, 2002):
        enroll(client, [image_bytes(pid, 10), image_bytes(pid, 11)], person_id=str(pid), camera_id="c2")
    response = client.post(
        "/query", files=files(image_bytes(2001, 11), name="image"), data={"top_k": "4", "branch_overlays": "true"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    matches = body["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3, 4]
    assert matches[0]["person_id"] == "2001" and matches[0]["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    for m in matches:
        assert np.mean(m["branch_scores"]) == pytest.approx(m["score"], abs=1e-5)
        grid = np.array(m["heatmap"]["grid"])
        assert grid.shape == (4, 2) and grid.mean() == pytest.approx(m["score"], abs=1e-4)
        assert np.array(m["heatmap"]["branch_grids"]).shape == (2, 4, 2)
        png = Image.open(io.BytesIO(__import__("base64").b64decode(m["heatmap"]["overlay_png"])))
        assert png.format == "PNG" and max(png.size) <= 256
    assert np.mean(body["query_heatmap"]["grid"]) == pytest.approx(1.0, abs=1e-4)
    assert all(len(m["heatmap"]["branch_overlays_png"]) == 2 for m in matches)
    lean = client.post(
        "/query", files=files(image_bytes(2001, 11), name="image"), data={"top_k": "4", "overlays": "true"}
    ).json()
    for heatmap in (lean["query_heatmap"], *(m["heatmap"] for m in lean["matches"])):  # the aggregate's PNG alone
        assert heatmap["branch_overlays_png"] == [] and heatmap["overlay_png"] and len(heatmap["branch_grids"]) == 2
    grids_only = client.post("/query", files=files(image_bytes(2001, 11), name="image"), data={"top_k": "4"})
    for heatmap in (
        grids_only.json()["query_heatmap"],
        *(m["heatmap"] for m in grids_only.json()["matches"]),
    ):  # by default, what the page draws
        assert (
            heatmap["overlay_png"] is None
            and heatmap["branch_overlays_png"] == []
            and len(heatmap["branch_grids"]) == 2
        )
    assert len(grids_only.content) < len(response.content) / 5
    # the second query's matches come from the map cache, in float16: cell by cell their grids agree to 1e-3
    # (float16 rounding over 16 channels), their means, the scores, to 1e-5
    lean_grids, grids = (np.array([m["heatmap"]["grid"] for m in ms]) for ms in (lean["matches"], matches))
    assert lean_grids == pytest.approx(grids, abs=1e-3) and lean_grids.mean(axis=(1, 2)) == pytest.approx(
        grids.mean(axis=(1, 2)), abs=1e-5
    )


def test_query_filters(client):
    enroll(client, [image_bytes(3000, 1)], person_id="3000", camera_id="c9")
    query = files(image_bytes(3000, 2), name="image")
    only = client.post("/query", files=query, data={"camera_id": "c9", "heatmaps": "false"}).json()["matches"]
    assert [m["camera_id"] for m in only] == ["c9"] and only[0]["heatmap"] is None
    excluded = client.post(
        "/query", files=query, data={"exclude_camera_id": "c9", "top_k": "20", "heatmaps": "false"}
    ).json()["matches"]
    assert excluded and all(m["camera_id"] != "c9" for m in excluded)
    high = client.post("/query", files=query, data={"min_score": "0.999", "heatmaps": "false"}).json()["matches"]
    assert all(m["score"] >= 0.999 for m in high)
    assert_error(client.post("/query", files=query, data={"min_score": "2"}), 422, "invalid_request")


def test_rerank_reorders_the_shortlist_and_keeps_scores_and_heatmaps_plain(server, client):
    from model_zoo.rerank import rerank_shortlist

    # 12 items on their own camera; the server re-ranks a shortlist of 8 (REID_RERANK_SHORTLIST), k1 = 20 clamped to 8
    ids = [
        i
        for pids in ((4000, 4001), (4002, 4003))
        for i in enroll(
            client,
            [image_bytes(pid, v) for pid in pids for v in (1, 2, 3)],
            person_id=[str(p) for p in pids for _ in range(3)],
            camera_id="rr",
        )
    ]
    query = {"files": files(image_bytes(4000, 1), name="image")}  # the same image as ids[0]
    plain = client.post("/query", **query, data={"camera_id": "rr", "top_k": "8", "heatmaps": "false"}).json()[
        "matches"
    ]
    body = client.post("/query", **query, data={"camera_id": "rr", "top_k": "5", "rerank": "true"}).json()
    assert body["reranked"] is True
    matches = body["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5] and matches[0]["id"] == ids[0]
    distances = [m["rerank_distance"] for m in matches]
    assert distances == sorted(distances) and all(0 <= d <= 1 for d in distances)
    # the same re-ranking computed here from the stored vectors of the plain shortlist (the query is ids[0]'s image)
    shortlist = [m["id"] for m in plain]
    expected, _ = rerank_shortlist(stored_embeddings(server, [ids[0]])[0], stored_embeddings(server, shortlist))
    expected = dict(zip(shortlist, expected))
    for m in matches:
        assert m["rerank_distance"] == pytest.approx(expected[m["id"]], abs=1e-3)
    left_out = [expected[i] for i in shortlist if i not in {m["id"] for m in matches}]
    assert max(distances) <= min(left_out) + 1e-3
    # score is still the plain mean cosine: the branch scores' mean and the heatmap grid's mean
    plain_scores = {m["id"]: m["score"] for m in plain}
    for m in matches:
        assert m["score"] == pytest.approx(plain_scores[m["id"]], abs=1e-5)
        assert np.mean(m["branch_scores"]) == pytest.approx(m["score"], abs=1e-5)
        assert np.array(m["heatmap"]["grid"]).mean() == pytest.approx(m["score"], abs=1e-4)
    assert "rerank" in body["timing_ms"]


def test_rerank_off_answers_as_before(client):
    query = {"files": files(image_bytes(4001, 2), name="image")}
    default = client.post("/query", **query, data={"top_k": "6", "heatmaps": "false"}).json()
    off = client.post("/query", **query, data={"top_k": "6", "heatmaps": "false", "rerank": "false"}).json()
    assert default["reranked"] is False and off["reranked"] is False
    for body in (default, off):
        assert all(m["rerank_distance"] is None for m in body["matches"])
        scores = [m["score"] for m in body["matches"]]
        assert scores == sorted(scores, reverse=True)
    assert [(m["id"], m["score"]) for m in off["matches"]] == [(m["id"], m["score"]) for m in default["matches"]]


def test_rerank_must_be_a_boolean(client):
    assert_error(
        client.post("/query", files=files(image_bytes(4001, 2), name="image"), data={"rerank": "maybe"}),
        422,
        "invalid_request",
    )


def test_a_model_without_attention_maps_or_pair_head_answers_as_before(client):
    model = client.get("/model").json()
    assert model["attention_maps"] is False and model["pair_head"] is False
    enroll(client, [image_bytes(5000, 1), image_bytes(5000, 2)], camera_id="plain")
    query = {"files": files(image_bytes(5000, 1), name="image")}
    body = client.post("/query", **query, data={"camera_id": "plain", "top_k": "2"}).json()
    assert set(body) == {
        "matches",
        "query_heatmap",
        "reranked",
        "heatmap_matches",
        "same_person_threshold",
        "gallery_size",
        "timing_ms",
    }
    assert set(body["timing_ms"]) == {"embed", "search", "heatmaps", "total"}
    for match in body["matches"]:
        assert set(match) == {
            "id",
            "rank",
            "score",
            "branch_scores",
            "rerank_distance",
            "person_id",
            "camera_id",
            "captured_at",
            "metadata",
            "same_person",
            "heatmap",
        }
    for heatmap in (body["query_heatmap"], *(m["heatmap"] for m in body["matches"])):
        assert set(heatmap) == {"grid", "branch_grids", "overlay_png", "branch_overlays_png"}
    assert_error(client.post("/query", **query, data={"pair_attention": "true"}), 409, "no_pair_head")
    assert_error(
        client.post("/query", **query, data={"pair_attention": "true", "rerank": "true"}), 422, "invalid_request"
    )


@pytest.mark.parametrize(
    "setting",
    [
        dict(rerank_shortlist=0),
        dict(rerank_shortlist=5000),
        dict(rerank_k1=0),
        dict(rerank_k2=0),
        dict(rerank_lambda=-0.1),
        dict(rerank_lambda=1.5),
    ],
)
def test_bad_rerank_settings_are_refused(setting):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(**setting)


def test_list_paginates_and_filters(client):
    total = gallery_total(client)
    first = client.get("/gallery", params={"limit": 2, "offset": 0}).json()
    second = client.get("/gallery", params={"limit": 2, "offset": 2}).json()
    assert first["total"] == total and len(first["items"]) == 2
    assert first["items"][-1]["id"] < second["items"][0]["id"]
    by_camera = client.get("/gallery", params={"camera_id": "c2"}).json()
    assert by_camera["total"] == 6 and all(i["camera_id"] == "c2" for i in by_camera["items"])
    assert_error(client.get("/gallery", params={"limit": 0}), 422, "invalid_request")


def test_delete_removes_from_index_and_store_together(client):
    [item_id] = enroll(client, [image_bytes(4100, 1)], person_id="4100")
    query = files(image_bytes(4100, 1), name="image")
    assert client.post("/query", files=query, data={"heatmaps": "false"}).json()["matches"][0]["id"] == item_id
    assert client.delete(f"/gallery/{item_id}").status_code == 204
    assert_error(client.get(f"/gallery/{item_id}"), 404, "not_found")
    ids = [
        m["id"] for m in client.post("/query", files=query, data={"top_k": "20", "heatmaps": "false"}).json()["matches"]
    ]
    assert item_id not in ids
    ready = client.get("/readyz").json()
    assert ready["index"]["size"] == ready["gallery_size"] == gallery_total(client)


def test_metrics_expose_latency_batches_queue_gallery_and_errors(client):
    text = client.get("/metrics").text
    for name in (
        "reid_request_seconds_bucket",
        "reid_batch_size_bucket",
        "reid_queue_wait_seconds_bucket",
        "reid_model_seconds_bucket",
        "reid_gallery_items",
        "reid_errors_total",
    ):
        assert name in text
    assert 'route="/query"' in text


def test_matches_maps_are_read_from_the_store_and_match_the_query_images_own(client):
    """service.stored_maps: no model call for the matches; the identical image's int8 maps give the grid the
    query image's own float32 maps give, within rounding, and every grid still averages to its score."""
    ids = enroll(client, [image_bytes(2700, v) for v in range(3)], person_id="2700")
    counters = [f'reid_heatmap_map_cache_total{{result="{r}"}}' for r in ("stored", "miss", "hit")]
    before = [metric(client, c) for c in counters]
    ask = {"top_k": "3", "person_id": "2700", "overlays": "false"}
    body = client.post("/query", files=files(image_bytes(2700, 0), name="image"), data=ask).json()
    assert [metric(client, c) for c in counters] == [before[0] + 3, before[1], before[2]]
    assert {m["id"] for m in body["matches"]} == set(ids) and body["heatmap_matches"] == 3
    same = body["matches"][0]
    assert same["score"] == pytest.approx(1.0, abs=1e-5)
    own = np.array(body["query_heatmap"]["branch_grids"])
    assert np.abs(np.array(same["heatmap"]["branch_grids"]) - own).max() <= 0.01 * np.ptp(own)
    for match in body["matches"]:
        assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-5)


@pytest.fixture(params=BACKENDS)
def gallery_settings(request):
    """A fresh gallery on each backend, for tests that start their own servers on it one after the other."""
    return backend_settings(request)


def test_maps_computed_for_items_stored_without_them_are_stored_for_the_next_query(
    tiny_model, tmp_path, gallery_settings
):
    """Items enrolled where maps were not stored (an older version, REID_STORED_MAPS_MAX_KB=0) are re-embedded by
    their first heatmap, which stores their maps in the background; the next heatmap reads them."""
    store = tmp_path / "gallery.sqlite3"
    with ServiceProcess(tiny_model[1], store, stored_maps_max_kb=0, **gallery_settings) as first:
        with first.client() as client:
            ids = enroll(client, [image_bytes(2800, v) for v in range(3)], person_id="2800")
    counters = [f'reid_heatmap_map_cache_total{{result="{r}"}}' for r in ("stored", "miss")]
    ask = {"top_k": "3", "person_id": "2800"}
    with ServiceProcess(tiny_model[1], store, heatmap_cache_mb=0, **gallery_settings) as second:
        with second.client() as client:
            first_answer = client.post("/query", files=files(image_bytes(2800, 0), name="image"), data=ask).json()
            assert [metric(client, c) for c in counters] == [0, 3]
            deadline = time.monotonic() + 10
            while stored_maps(first, ids) < 3 and time.monotonic() < deadline:  # the answer did not wait for it
                time.sleep(0.1)
            again = client.post("/query", files=files(image_bytes(2800, 0), name="image"), data=ask).json()
            assert [metric(client, c) for c in counters] == [3, 3]
    assert {m["id"] for m in again["matches"]} == set(ids)
    for before, after in zip(first_answer["matches"], again["matches"]):
        grid = np.array(after["heatmap"]["grid"])
        assert np.abs(grid - np.array(before["heatmap"]["grid"])).max() <= 0.01 * np.ptp(before["heatmap"]["grid"])
        assert grid.mean() == pytest.approx(after["score"], abs=1e-5)


def test_a_match_drawn_again_takes_its_maps_from_the_cache_and_its_delete_clears_them(client_without_stored_maps):
    client = client_without_stored_maps
    ids = enroll(client, [image_bytes(2600, v) for v in range(3)], person_id="2600")
    ask = {"top_k": "3", "person_id": "2600", "branch_overlays": "false"}
    hits, misses = 'reid_heatmap_map_cache_total{result="hit"}', 'reid_heatmap_map_cache_total{result="miss"}'
    before = metric(client, hits), metric(client, misses)
    first = client.post("/query", files=files(image_bytes(2600, 0), name="image"), data=ask).json()["matches"]
    after_first = metric(client, hits), metric(client, misses), metric(client, "reid_heatmap_map_cache_bytes")
    second = client.post("/query", files=files(image_bytes(2600, 1), name="image"), data=ask).json()["matches"]
    assert after_first[:2] == (before[0], before[1] + 3) and metric(client, hits) == before[0] + 3
    assert {m["id"] for m in first} == {m["id"] for m in second} == set(ids)
    for match in second:  # from float16 maps, the identity still holds
        assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-5)
    assert client.delete(f"/gallery/{ids[0]}").status_code == 204
    # the tiny model's maps: 2 branches x 16 channels x 4x2 cells in float16, 512 bytes an item
    assert metric(client, "reid_heatmap_map_cache_bytes") == after_first[2] - 512
    assert client.delete("/persons/2600").json()["removed"] == 2  # an erasure takes the person's maps out of memory too
    assert metric(client, "reid_heatmap_map_cache_bytes") == after_first[2] - 3 * 512


def test_build_info_names_the_model_and_the_queue_depth_is_a_gauge(client):
    import re

    model = client.get("/model").json()
    text = client.get("/metrics").text
    info = re.search(r"^reid_build_info\{(.*)\} 1\.0$", text, flags=re.M)
    assert info, text[:500]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert labels["model_fingerprint"] == model["fingerprint"] and labels["architecture"] == model["architecture"]
    assert labels["provider"] == "CPUExecutionProvider" and labels["version"]
    assert re.search(r"^reid_queued_images 0\.0$", text, flags=re.M)


def test_openapi_documents_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/gallery",
        "/gallery/{item_id}",
        "/gallery/{item_id}/image",
        "/query",
        "/healthz",
        "/readyz",
        "/model",
        "/metrics",
    } <= set(paths)


def test_the_api_reference_is_served_from_the_server_itself_and_the_ready_line_names_the_url(server, client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert not re.findall(r"(?:src|href)=['\"](?:https?:)?//", page.text)  # nothing from a CDN: it works offline
    for asset in re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text):
        assert client.get("/" + asset.lstrip("/")).status_code == 200, asset
    assert f"ready: {server.url}/" in server.output()


def test_service_embeddings_equal_the_exporters_on_the_same_files(server, client, tiny_model, market_root):
    import torch

    from model_zoo.preprocess import load_for_model
    from training.checkpoints import load_trained_model

    paths = sorted((market_root / "query").iterdir())[:3]
    ids = enroll(client, [p.read_bytes() for p in paths])
    model, cfg = load_trained_model(tiny_model[0])
    with torch.no_grad():
        expected = model(
            torch.from_numpy(np.stack([load_for_model(p, cfg.data.height, cfg.data.width) for p in paths]))
        ).embedding.numpy()
    np.testing.assert_allclose(stored_embeddings(server, ids), expected, atol=1e-4)


def test_api_key_protects_every_route_but_health(tiny_model, tmp_path):
    with (
        ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3", api_key="s3cret") as process,
        process.client() as anonymous,
    ):
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
        for response in (
            anonymous.get("/gallery"),
            anonymous.get("/model"),
            anonymous.get("/metrics"),
            anonymous.post("/gallery", files=files(image_bytes(1, 1))),
            anonymous.get("/gallery", headers={"X-API-Key": "wrong"}),
        ):
            assert_error(response, 401, "unauthorized")
        assert anonymous.get("/gallery", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_the_service_never_imports_torch():
    code = "import sys, service.app, service.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_an_oversized_body_is_refused_before_it_is_read(server, client):
    limit = 8 * 300_000 + 1024 * 1024
    assert_error(
        client.post(
            "/gallery", content=b"x" * (limit + 1), headers={"content-type": "multipart/form-data; boundary=b"}
        ),
        413,
        "payload_too_large",
    )

    def chunks():  # a well-formed multipart upload of one huge file, streamed without a Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n'
        yield b"Content-Type: image/jpeg\r\n\r\n"
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536
        yield b"\r\n--b--\r\n"

    assert_error(
        client.post("/gallery", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}),
        413,
        "payload_too_large",
    )
    assert client.get("/healthz").status_code == 200


@contextlib.contextmanager
def in_process(tiny_model, tmp_path):
    """The app in this process (lifespan and all), for tests that must reach into its store."""
    from service.app import create_app

    app = create_app(Settings(model_path=tiny_model[1], store_path=tmp_path / "g.sqlite3", intra_op_threads=1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            yield app, client


def test_a_full_disk_is_a_503_and_writes_nothing(tiny_model, tmp_path):
    # SQLite's own page limit makes the disk "full" (SQLITE_FULL), as a real one would.
    with in_process(tiny_model, tmp_path) as (app, c):
        enroll(c, [image_bytes(1, 1)])
        store = app.state.serving.gallery.store
        pages = store.writer.execute("PRAGMA page_count").fetchone()[0]
        store.writer.execute(f"PRAGMA max_page_count = {pages}")
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 100, 3), np.uint8)).save(noise, format="PNG")
        response = c.post("/gallery", files=[("images", ("a.png", noise.getvalue(), "image/png"))])  # needs new pages
        assert response.status_code == 503 and response.json()["error"]["code"] == "storage_unavailable"
        assert store.count() == 1 and c.get("/readyz").json()["index"]["size"] == 1
        store.writer.execute("PRAGMA max_page_count = 1073741823")
        enroll(c, [image_bytes(3, 1)])  # the writer goes on once there is room again
        assert store.count() == 2


def test_a_query_skips_an_item_whose_delete_is_committed_but_not_yet_indexed(tiny_model, tmp_path):
    with in_process(tiny_model, tmp_path) as (app, c):
        ids = enroll(c, [image_bytes(1, 1), image_bytes(2, 1)])
        app.state.serving.gallery.store.delete(ids[0])  # the writer thread's commit, before the index has heard of it
        response = c.post(
            "/query", files=[("image", ("q.jpg", image_bytes(1, 1), "image/jpeg"))], data={"heatmaps": "true"}
        )
        assert response.status_code == 200, response.text
        assert [m["id"] for m in response.json()["matches"]] == [ids[1]]


def test_an_overloaded_service_answers_503_with_retry_after_and_writes_nothing(tiny_model, tmp_path):
    with in_process(tiny_model, tmp_path) as (app, c):
        app.state.serving.batcher.max_queued_images = 0  # as if the queue were full
        response = c.post("/gallery", files=files(image_bytes(1, 1)))
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1" and app.state.serving.gallery.store.count() == 0
