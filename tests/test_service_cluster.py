"""The cluster backend as replicas use it: two real servers on one PostgreSQL database and one Milvus
collection (milvus-lite's server), killed, cut off from Milvus, started on a damaged index or a changed
model. The API suite itself runs on this backend too (tests/test_service_api.py and the others whose
``server`` fixture is parametrized by ``tests.cluster.BACKENDS``)."""

import json
from contextlib import ExitStack

import psycopg
import pytest

from harness.cluster import MilvusServer, PostgresServer, milvus_connection, unavailable, wait_until
from tests.conftest import image_bytes
from harness.server import ServiceProcess, enrol, metric, query
from tests.server import assert_error

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def files(*blobs, name="images"):
    return [(name, (f"img{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]


def matches(client, blob, **fields):
    response = query(client, blob, **{"top_k": 20, "heatmaps": False, **fields})
    assert response.status_code == 200, response.text
    return response.json()["matches"]


def replicas(tiny_model, tmp_path, settings, count=2, model=None):
    """``count`` servers on one cluster gallery (each with its own unused SQLite path)."""
    return [ServiceProcess(model or tiny_model[1], tmp_path / f"unused{i}.sqlite3", **settings) for i in range(count)]


def test_any_replica_answers_what_another_acknowledged(cluster_servers, tiny_model, tmp_path):
    settings = cluster_servers.new_gallery()
    with ExitStack() as stack:
        # no stored maps: the matches' maps go to each replica's cache, which another replica's delete must clear
        cached_maps = {**settings, "stored_maps_max_kb": 0}
        a, b = (stack.enter_context(server) for server in replicas(tiny_model, tmp_path, cached_maps))
        ca, cb = stack.enter_context(a.client()), stack.enter_context(b.client())
        ids = enrol(
            ca, [image_bytes(1, 0), image_bytes(2, 0), image_bytes(3, 0)], person_id=["1", "2", "3"], camera_id="c1"
        )
        found = cb.post("/query", files=files(image_bytes(1, 0), name="image"), data={"top_k": "3"}).json()["matches"]
        assert found[0]["id"] == ids[0] and found[0]["score"] == pytest.approx(1, abs=1e-5)
        for match in found:  # the heatmap on replica B still averages to the score Milvus gave
            grid = match["heatmap"]["grid"]
            assert sum(map(sum, grid)) / (len(grid) * len(grid[0])) == pytest.approx(match["score"], abs=1e-5)
        assert cb.get(f"/gallery/{ids[1]}").json()["person_id"] == "2"
        assert cb.get(f"/gallery/{ids[1]}/image").content == image_bytes(2, 0)

        ca.post("/query", files=files(image_bytes(1, 0), name="image"), data={"top_k": "3"})
        cached = metric(ca, "reid_heatmap_map_cache_bytes")
        assert cached > 0  # A drew the three matches of a query of its own: their maps are cached there
        assert cb.delete(f"/gallery/{ids[0]}").status_code == 204
        assert cb.delete("/persons/3").json()["ids"] == [ids[2]]
        assert [m["id"] for m in matches(ca, image_bytes(1, 0))] == [ids[1]]
        assert_error(ca.get(f"/gallery/{ids[0]}"), 404, "not_found")
        # B's removals reach A's feature-map cache (a PostgreSQL notification): only ids[1]'s maps are left
        wait_until(
            lambda: metric(ca, "reid_heatmap_map_cache_bytes") == pytest.approx(cached / 3, rel=0.01),
            "A's cache",
            timeout=10,
        )


def test_a_replica_killed_after_its_answer_loses_nothing(cluster_servers, tiny_model, tmp_path):
    settings = cluster_servers.new_gallery()
    a, b = replicas(tiny_model, tmp_path, settings)
    with a, b, a.client() as ca, b.client() as cb:
        ids = enrol(ca, [image_bytes(5, v) for v in range(4)], person_id="5")
        a.kill()
        assert sorted(m["id"] for m in matches(cb, image_bytes(5, 0))) == ids
    with ServiceProcess(tiny_model[1], tmp_path / "again.sqlite3", **settings) as again, again.client() as client:
        assert client.get("/gallery").json()["total"] == 4


def test_with_milvus_unreachable_writes_fail_whole_and_then_work_again(cluster_servers, tiny_model, tmp_path):
    milvus = MilvusServer(tmp_path / "own-milvus").start()
    settings = {**cluster_servers.new_gallery(), "milvus_uri": milvus.uri}
    try:
        with (
            ServiceProcess(tiny_model[1], tmp_path / "unused.sqlite3", **settings) as server,
            server.client() as client,
        ):
            enrol(client, [image_bytes(6, 0)], person_id="6")
            milvus.stop()
            assert_error(
                client.post("/gallery", files=files(image_bytes(7, 0), image_bytes(7, 1))), 503, "storage_unavailable"
            )
            assert_error(
                client.post("/query", files=files(image_bytes(6, 0), name="image")), 503, "storage_unavailable"
            )
            assert client.get("/gallery").json()["total"] == 1  # the failed enrolment left no row
            assert_error(client.get("/readyz"), 503, "storage_unavailable")  # a load balancer stops sending it requests
            milvus.start()  # the same port and data: the server's Milvus client reconnects by itself
            wait_until(lambda: client.get("/readyz").status_code == 200, "the replica", timeout=30)
            enrol(client, [image_bytes(7, 0)], person_id="7")
            assert {m["person_id"] for m in matches(client, image_bytes(7, 0))} == {"6", "7"}
    finally:
        milvus.stop()


def test_a_starting_replica_brings_milvus_in_step_with_postgres(cluster_servers, tiny_model, tmp_path):
    settings = cluster_servers.new_gallery()
    with ServiceProcess(tiny_model[1], tmp_path / "a.sqlite3", **settings) as server, server.client() as client:
        ids = enrol(client, [image_bytes(8, v) for v in range(3)], person_id="8")
    collection = settings["milvus_collection"]
    with milvus_connection(settings["milvus_uri"]) as milvus:
        milvus.delete(collection, ids=[ids[0]])  # a vector lost
        orphan = milvus.query(collection, ids=[ids[1]], output_fields=["*"])[0]
        milvus.upsert(collection, [{**orphan, "id": 10**12}])  # a vector without a row: a write whose commit never came
    with ServiceProcess(tiny_model[1], tmp_path / "b.sqlite3", **settings) as server, server.client() as client:
        assert sorted(m["id"] for m in matches(client, image_bytes(8, 0))) == ids
    with milvus_connection(settings["milvus_uri"]) as milvus:
        assert milvus.query(collection, ids=[10**12]) == []
        milvus.drop_collection(collection)  # the whole index lost: rebuilt from PostgreSQL
    with ServiceProcess(tiny_model[1], tmp_path / "c.sqlite3", **settings) as server, server.client() as client:
        assert sorted(m["id"] for m in matches(client, image_bytes(8, 0))) == ids


def test_a_model_change_reembeds_once_and_the_old_replica_stops_writing(cluster_servers, tiny_model, tmp_path):
    from training import export

    other = tmp_path / "other.onnx"
    figures = tmp_path / "metrics.json"
    figures.write_text('{"evaluation": {"market": {"all": {"mAP": 0.5}}}}')
    export(tiny_model[0], other, evaluation=figures)  # same weights, other metadata: another fingerprint
    settings = cluster_servers.new_gallery()
    old_replica = ServiceProcess(tiny_model[1], tmp_path / "old.sqlite3", stored_maps_max_kb=0, **settings)
    with old_replica as old, old.client() as old_client:
        [item_id] = enrol(old_client, [image_bytes(9, 0)], person_id="9")
        with pytest.raises(RuntimeError, match="REID_ON_MODEL_CHANGE"):
            ServiceProcess(other, tmp_path / "refused.sqlite3", on_model_change="refuse", **settings).start()
        with ServiceProcess(other, tmp_path / "new.sqlite3", **settings) as new, new.client() as new_client:
            assert matches(new_client, image_bytes(9, 0))[0]["id"] == item_id
            fingerprint = new_client.get("/readyz").json()["model_fingerprint"]
            assert_error(old_client.post("/gallery", files=files(image_bytes(9, 1))), 409, "model_changed")
            assert_error(old_client.get("/readyz"), 503, "model_changed")
            assert new_client.get("/gallery").json()["total"] == 1
    with psycopg.connect(settings["postgres_dsn"]) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'model_fingerprint'").fetchone()[0] == fingerprint
        # the old replica stored no maps; re-embedding wrote the new model's (service.stored_maps)
        assert db.execute("SELECT maps IS NOT NULL FROM items WHERE id = %s", (item_id,)).fetchone()[0]


def test_filters_on_labels_with_quotes_backslashes_and_emoji_match_exactly(cluster_servers, tiny_model, tmp_path):
    settings = cluster_servers.new_gallery()
    labels = ['a"b', "a\\", 'a\\"b or person_id != "', "\U0001f600 caf\u00e9", "x' or 1==1"]
    with ServiceProcess(tiny_model[1], tmp_path / "a.sqlite3", **settings) as server, server.client() as client:
        ids = enrol(
            client,
            [image_bytes(10, v) for v in range(len(labels))],
            person_id=labels,
            camera_id=labels,
            metadata=json.dumps({"big": 10**30}),
        )
        for item_id, label in zip(ids, labels):
            assert [m["id"] for m in matches(client, image_bytes(10, 0), person_id=label)] == [item_id]
            assert [m["id"] for m in matches(client, image_bytes(10, 0), camera_id=label)] == [item_id]
            assert item_id not in [m["id"] for m in matches(client, image_bytes(10, 0), exclude_camera_id=label)]
        assert client.get(f"/gallery/{ids[0]}").json()["metadata"] == {"big": 10**30}  # PostgreSQL's exact copy


def test_with_postgres_restarted_the_replica_recovers(tiny_model, tmp_path):
    postgres, milvus = PostgresServer().start(), MilvusServer(tmp_path / "milvus").start()
    settings = {
        "gallery_backend": "cluster",
        "postgres_dsn": postgres.new_database("restarted"),
        "milvus_uri": milvus.uri,
        "milvus_collection": "restarted",
    }
    try:
        with (
            ServiceProcess(tiny_model[1], tmp_path / "unused.sqlite3", **settings) as server,
            server.client() as client,
        ):
            [first] = enrol(client, [image_bytes(11, 0)], person_id="11")
            postgres.halt()
            assert_error(client.post("/gallery", files=files(image_bytes(12, 0))), 503, "storage_unavailable")
            assert_error(client.get(f"/gallery/{first}"), 503, "storage_unavailable")
            assert_error(client.get("/readyz"), 503, "storage_unavailable")
            postgres.start()
            wait_until(lambda: client.get("/readyz").status_code == 200, "the replica", timeout=30)
            enrol(client, [image_bytes(12, 0)], person_id="12")
            assert {m["person_id"] for m in matches(client, image_bytes(12, 0))} == {"11", "12"}
    finally:
        milvus.stop()
        postgres.stop()


def test_retention_on_any_replica_erases_from_postgres_and_milvus(cluster_servers, tiny_model, tmp_path):
    settings = cluster_servers.new_gallery()
    with ServiceProcess(tiny_model[1], tmp_path / "a.sqlite3", **settings) as server, server.client() as client:
        old = enrol(
            client, [image_bytes(13, 0), image_bytes(13, 1)], person_id="13", captured_at="2024-06-01T12:00:00Z"
        )
        [kept] = enrol(client, [image_bytes(14, 0)], person_id="14")
    with (
        ServiceProcess(tiny_model[1], tmp_path / "b.sqlite3", retention_days=30, **settings) as server,
        server.client() as client,
    ):
        assert [m["id"] for m in matches(client, image_bytes(13, 0))] == [kept]
        assert client.get("/gallery").json()["total"] == 1
    with milvus_connection(settings["milvus_uri"]) as milvus:
        assert milvus.query(settings["milvus_collection"], ids=old) == []
