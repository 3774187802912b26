"""Faults: kill -9 during a stream of enrolments, concurrent writers and readers, a model change at start."""

import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest

from model_zoo.preprocess import load_for_model
from service.inference import InferenceModel
from service.stored_maps import unpack
from tests.conftest import image_bytes
from harness.server import ServiceProcess

pytestmark = pytest.mark.slow


def query_ids_scores(client, blob, top_k=20):
    response = client.post(
        "/query", files=[("image", ("q.jpg", blob, "image/jpeg"))], data={"top_k": str(top_k), "heatmaps": "false"}
    )
    assert response.status_code == 200, response.text
    return [(m["id"], m["score"]) for m in response.json()["matches"]]


def enroll_one(client, blob, person):
    response = client.post("/gallery", files=[("images", ("a.jpg", blob, "image/jpeg"))], data={"person_id": person})
    assert response.status_code == 201, response.text
    return response.json()["ids"][0]


def test_kill_9_during_enrolments_loses_only_requests_in_flight(tiny_model, tmp_path):
    store = tmp_path / "gallery.sqlite3"
    acknowledged = []
    server = ServiceProcess(tiny_model[1], store, max_top_k=5000).start()
    with server.client() as client:
        for i in range(6):
            acknowledged.append(enroll_one(client, image_bytes(10 + i, i), f"p{i}"))
        probe = image_bytes(12, 2)
        before = query_ids_scores(client, probe)

    stop = threading.Event()

    def stream(worker: int):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    response = c.post(
                        "/gallery", files=[("images", ("s.jpg", image_bytes(100 + worker, n), "image/jpeg"))]
                    )
                except httpx.HTTPError:
                    return
                if response.status_code == 201:
                    acknowledged.extend(response.json()["ids"])

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    server.kill()
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) > 6, "no enrolment was acknowledged during the stream"

    assert sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ServiceProcess(tiny_model[1], store, max_top_k=5000) as restarted, restarted.client() as client:
        for item_id in acknowledged:
            assert client.get(f"/gallery/{item_id}").status_code == 200, item_id
        ready = client.get("/readyz").json()
        assert ready["index"]["size"] == ready["gallery_size"] >= len(acknowledged)
        after = query_ids_scores(client, probe, top_k=ready["gallery_size"])
        old = {i for i, _ in before}
        assert [(i, round(s, 5)) for i, s in after if i in old] == [(i, round(s, 5)) for i, s in before]


def test_concurrent_enrol_delete_and_query_keep_index_and_store_consistent(tiny_model, tmp_path):
    # One model thread: it waits for company up to max_batch_wait (several threads each take their share and go).
    with ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3", max_batch_wait_ms=20, model_instances=1) as server:
        with server.client() as client:
            seed_ids = [enroll_one(client, image_bytes(1, i), "seed") for i in range(4)]
        errors = []
        deleting = []

        def enroller(w):
            with server.client() as c:
                for n in range(6):
                    enroll_one(c, image_bytes(200 + w, n), f"w{w}")

        def deleter():
            with server.client() as c:
                for item_id in seed_ids[:3]:
                    deleting.append(item_id)  # from here on it may vanish from queries and lookups
                    assert c.delete(f"/gallery/{item_id}").status_code == 204

        def querier():
            with server.client() as c:
                for n in range(6):
                    for item_id, _ in query_ids_scores(c, image_bytes(1, n)):
                        if c.get(f"/gallery/{item_id}").status_code != 200 and item_id not in deleting:
                            errors.append(item_id)

        def guard(fn, *args):
            try:
                fn(*args)
            except Exception as exc:  # surfaced after join
                errors.append(repr(exc))

        threads = [threading.Thread(target=guard, args=(enroller, w)) for w in range(3)]
        threads += [threading.Thread(target=guard, args=(deleter,)), threading.Thread(target=guard, args=(querier,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with server.client() as client:
            listed = {i["id"] for i in client.get("/gallery", params={"limit": 500}).json()["items"]}
            ready = client.get("/readyz").json()
            assert len(listed) == ready["index"]["size"] == ready["gallery_size"] == 4 + 18 - 3
            found = {i for i, _ in query_ids_scores(client, image_bytes(1, 0), top_k=50)}
            assert found == listed
            batches = [
                line for line in client.get("/metrics").text.splitlines() if line.startswith("reid_batch_size_count")
            ]
            enrol_calls = 4 + 18 + 6 * 1
            assert float(batches[0].split()[-1]) < enrol_calls, "no two requests were ever batched together"


def test_a_gallery_from_another_model_is_reembedded_or_refused(tiny_model, market_root, tmp_path):
    from training import export

    store = tmp_path / "g.sqlite3"
    with ServiceProcess(tiny_model[1], store, stored_maps_max_kb=0) as server, server.client() as client:
        item_id = enroll_one(client, image_bytes(5, 1), "x")
        old = query_ids_scores(client, image_bytes(5, 1))
    other = tmp_path / "other.onnx"
    figures = tmp_path / "metrics.json"
    figures.write_text('{"evaluation": {"market": {"all": {"mAP": 0.5}}}}')
    export(tiny_model[0], other, evaluation=figures)  # same weights, other metadata: another fingerprint
    with pytest.raises(RuntimeError, match="REID_ON_MODEL_CHANGE"):
        ServiceProcess(other, store, on_model_change="refuse").start()
    with ServiceProcess(other, store) as server, server.client() as client:
        assert client.get(f"/gallery/{item_id}").status_code == 200
        assert query_ids_scores(client, image_bytes(5, 1))[0][0] == old[0][0]
        fingerprint = client.get("/readyz").json()["model_fingerprint"]
    db = sqlite3.connect(store)
    assert db.execute("SELECT value FROM meta WHERE key = 'model_fingerprint'").fetchone()[0] == fingerprint
    # re-embedding writes the new model's maps (service.stored_maps), here where the first server stored none
    stored = unpack(db.execute("SELECT maps FROM items WHERE id = ?", (item_id,)).fetchone()[0])
    model = InferenceModel(other, "cpu").load()
    _, maps = model.predict(load_for_model(image_bytes(5, 1), *model.input_size)[None])
    assert np.abs(stored - maps.features[0]).max() <= np.abs(maps.features).max() / 127
