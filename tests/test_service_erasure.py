"""Time, erasure and retention (issue 14) over HTTP against a real server: capture times stored, returned and
filtered on; a person erased in one step with nothing of them left in the store's files (the database and its
WAL, before and after VACUUM) or the index; retention purging what is older than REID_RETENTION_DAYS; a gallery
file from before capture times opening and working."""

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Dict, List
from urllib.parse import quote

import numpy as np
import pytest

from client import AsyncReIDClient, ReIDClient, ReIDError
from service.store import SCHEMA, SCHEMA_VERSION
from tests.conftest import image_bytes
from tests.cluster import BACKENDS, backend_settings
from harness.server import ServiceProcess
from tests.server import assert_error, onnx_outputs
from tests.test_service_api import enroll, files

pytestmark = pytest.mark.slow
NOON = 1717243200.0  # 2024-06-01T12:00:00Z
HOUR = 3600.0


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tiny_model, tmp_path_factory):
    with ServiceProcess(
        tiny_model[1], tmp_path_factory.mktemp("time") / "gallery.sqlite3", max_top_k=50, **backend_settings(request)
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def match_ids(client, blob: bytes, **fields) -> List[int]:
    data = {"top_k": "50", "heatmaps": "false", **fields}
    response = client.post("/query", files=files(blob, name="image"), data=data)
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["matches"]]


def listed(client, **params) -> List[int]:
    page = client.get("/gallery", params={"limit": 500, **params})
    assert page.status_code == 200, page.text
    return [item["id"] for item in page.json()["items"]]


# -- time


def test_capture_times_are_stored_returned_and_filtered(client):
    # 12:00Z as ISO, 14:00Z as epoch seconds, 16:00Z as ISO in another zone, and one of unknown time
    times = ["2024-06-01T12:00:00Z", str(int(NOON + 2 * HOUR)), "2024-06-01T18:00:00+02:00"]
    blobs = [image_bytes(7000, v) for v in range(4)]
    response = client.post("/gallery", files=files(*blobs[:3]), data={"person_id": "t", "captured_at": times})
    assert response.status_code == 201, response.text
    timed = response.json()["ids"]
    [unknown] = enroll(client, blobs[3:], person_id="t")
    assert [i["captured_at"] for i in response.json()["items"]] == [NOON, NOON + 2 * HOUR, NOON + 4 * HOUR]
    assert client.get(f"/gallery/{unknown}").json()["captured_at"] is None
    assert client.get(f"/gallery/{timed[1]}").json()["captured_at"] == NOON + 2 * HOUR

    # captured_after <= captured_at < captured_before; an item of unknown time is in no range
    window = {"captured_after": "2024-06-01T13:00:00Z", "captured_before": str(int(NOON + 4 * HOUR))}
    assert listed(client, person_id="t", **window) == [timed[1]]
    assert listed(client, person_id="t", captured_after=str(int(NOON + 2 * HOUR))) == timed[1:]
    assert listed(client, person_id="t") == [*timed, unknown]
    for i, blob in enumerate(blobs):
        assert match_ids(client, blob, person_id="t", **window) == [timed[1]], i
    assert match_ids(client, blobs[3], person_id="t", captured_before="2024-06-01T12:00:00.000001Z") == [timed[0]]
    best = client.post("/query", files=files(blobs[1], name="image"), data={"top_k": "1", "heatmaps": "false"}).json()[
        "matches"
    ][0]
    assert (best["id"], best["captured_at"]) == (timed[1], NOON + 2 * HOUR)


@pytest.mark.parametrize(
    "value",
    [
        "2024-06-01T12:00:00",  # no time zone
        "2024-06-01",
        "June 1st 2024",
        "20240601T120000Z",
        "2024-06-01x12:00:00Z",
        " 1717243200",
        "1717243200\n",
        "2024-13-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-06-01T24:00:00Z",
        "2024-06-01T12:00:00+25:00",
        "-1",
        "1e9",
        "nan",
        "inf",
        "0x10",
        "1_717_243_200",
        "\u0661\u0667\u0661\u0667",  # Arabic-Indic digits
        "1969-12-31T23:59:59Z",
        "999999999999",
        str(int(time.time() + 2 * 86400)),  # before 1970, after 9999, two days ahead
    ],
)
def test_bad_capture_times_are_refused_and_nothing_is_written(client, value):
    before = listed(client)
    response = client.post(
        "/gallery", files=files(image_bytes(7001, 1), image_bytes(7001, 2)), data={"captured_at": value}
    )
    assert_error(response, 422, "invalid_request")
    assert "captured_at" in response.json()["error"]["message"]
    assert listed(client) == before


def test_bad_time_filters_are_refused(client):
    query = files(image_bytes(7000, 0), name="image")
    too_many = client.post(
        "/gallery", files=files(image_bytes(7002, 1), image_bytes(7002, 2)), data={"captured_at": ["1", "2", "3"]}
    )
    assert_error(too_many, 422, "invalid_request")
    for fields in (
        {"captured_after": "yesterday"},
        {"captured_before": "2024-06-01T12:00:00"},
        {"captured_after": "2024-06-02T00:00:00Z", "captured_before": "2024-06-01T00:00:00Z"},
        {"captured_after": "1717243200", "captured_before": "1717243200"},
    ):
        assert_error(client.post("/query", files=query, data=fields), 422, "invalid_request")
        assert_error(client.get("/gallery", params=fields), 422, "invalid_request")


def test_the_client_sends_capture_times_and_time_filters(server):
    from datetime import datetime, timezone

    taken = [datetime(2024, 6, 2, 8, tzinfo=timezone.utc), NOON + 30 * HOUR, "2024-06-02T16:00:00+00:00"]
    with ReIDClient(server.url) as reid:
        items = reid.enroll([image_bytes(7003, v) for v in range(3)], person_id="c", captured_at=taken)
        assert [i.captured_at for i in items] == [NOON + 20 * HOUR, NOON + 30 * HOUR, NOON + 28 * HOUR]
        page = reid.gallery(
            person_id="c", captured_after=NOON + 24 * HOUR, captured_before=datetime(2024, 6, 3, tzinfo=timezone.utc)
        )
        assert [i.id for i in page.items] == [items[1].id, items[2].id]
        result = reid.query(
            image_bytes(7003, 0), top_k=3, heatmaps=False, person_id="c", captured_before=NOON + 24 * HOUR
        )
        assert [(m.id, m.captured_at) for m in result.matches] == [(items[0].id, NOON + 20 * HOUR)]
        with pytest.raises(ReIDError) as error:
            reid.enroll([image_bytes(7003, 9)], captured_at=datetime(2024, 6, 2))  # naive: its zone is unknown
        assert (error.value.status, error.value.code) == (422, "invalid_request")


# -- erasure: nothing of an erased person may be left in the store's files


def store_files(store: Path) -> Dict[str, bytes]:
    """The database file and its WAL as they lie on disk (a WAL that is not there is empty)."""
    wal = store.with_name(store.name + "-wal")
    return {"database": store.read_bytes(), "wal": wal.read_bytes() if wal.exists() else b""}


def traces(store: Path, needles: Dict[str, bytes]) -> Dict[str, List[str]]:
    """For each file, which of ``needles`` (name: bytes) it still holds."""
    found = {
        name: [label for label, needle in needles.items() if needle in data]
        for name, data in store_files(store).items()
    }
    return {name: labels for name, labels in found.items() if labels}


def stored_features(store: Path, ids: List[int]) -> List[bytes]:
    """Each item's embedding and stored feature maps (service.stored_maps), as the store holds them."""
    db = sqlite3.connect(store)
    try:
        rows = [db.execute("SELECT embedding, maps FROM items WHERE id = ?", (i,)).fetchone() for i in ids]
    finally:
        db.close()
    assert all(maps is not None for _, maps in rows)
    return [blob for row in rows for blob in row]


def needles_of(blobs: List[bytes], features: List[bytes], *texts: str) -> Dict[str, bytes]:
    """What would betray an item: its text, the last 48 bytes of its image's compressed pixels (the header and
    its tables are the same in every JPEG), its embedding's and its stored maps' bytes."""
    needles = {text: text.encode() for text in texts}
    for i, blob in enumerate(blobs):
        needles[f"image {i}"] = blob[-50:-2]  # before the end-of-image marker
    for i, vector in enumerate(features):
        needles[f"features {i}"] = vector
    return needles


def vacuum(store: Path) -> None:
    db = sqlite3.connect(store, isolation_level=None)
    try:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def test_erasing_a_person_leaves_nothing_in_the_store_files_or_the_index(tiny_model, tmp_path):
    store = tmp_path / "gallery.sqlite3"
    person = f"erase/me {uuid.uuid4().hex}"  # a "/" too: sent as %2F, one path segment
    marker = f"marker-{uuid.uuid4().hex}"
    blobs = [image_bytes(8000, v) for v in range(3)]
    with ServiceProcess(tiny_model[1], store, max_top_k=50) as server, server.client() as client:
        kept = enroll(
            client, [image_bytes(8001, v) for v in range(4)], person_id="kept", metadata='{"note": "keep me"}'
        )
        erased = enroll(
            client, blobs, person_id=person, metadata=f'{{"note": "{marker}"}}', captured_at="2024-06-01T12:00:00Z"
        )
        kept += enroll(client, [image_bytes(8002, 0)], person_id="kept too")
        needles = needles_of(blobs, stored_features(store, erased), person, marker)
        assert set(sum(traces(store, needles).values(), [])) == set(
            needles
        )  # the search finds them while they are there

        response = client.delete(f"/persons/{quote(person, safe='')}")
        assert response.status_code == 200, response.text
        assert response.json() == {"person_id": person, "removed": 3, "ids": erased}
        assert_error(client.delete(f"/persons/{quote(person, safe='')}"), 404, "not_found")
        for item_id in erased:
            assert_error(client.get(f"/gallery/{item_id}"), 404, "not_found")
        assert listed(client, person_id=person) == [] and listed(client) == kept
        for blob in blobs:
            assert not set(match_ids(client, blob)) & set(erased)
        ready = client.get("/readyz").json()
        # removed from FAISS's memory, not hidden behind tombstones
        assert ready["index"]["size"] == ready["gallery_size"] == len(kept) and ready["index"]["tombstones"] == 0
        assert traces(store, needles) == {}  # the running server's files: zeroed pages, the WAL truncated
        assert traces(store, needles_of([], [], "keep me")) == {"database": ["keep me"]}  # the others' bytes are intact
    assert traces(store, needles) == {}
    vacuum(store)
    assert traces(store, needles) == {}
    with ServiceProcess(tiny_model[1], store) as server, server.client() as client:
        assert listed(client) == kept


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_erased_vectors_leave_the_index_memory_on_every_index_type(kind):
    from service.index import VectorIndex

    vectors = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    index = VectorIndex(8, kind, "cpu", ivf_nlist=2)
    index.rebuild([(np.arange(1, 101), vectors)])
    index.erase([5, 6])
    assert 5 not in [i for i, _ in index.search(vectors[4], 10)] and index.size == 98
    assert not index.holds_erased and not index.needs_rebuild  # nothing erased is left for a rebuild to drop
    if kind == "hnsw":  # HNSW cannot remove ids: the vectors are zeroed where they lie, the ids hidden
        held = index._held_vectors()
        assert not (held[:, None] == vectors[None, 4:6]).all(axis=2).any() and (held[4:6] == 0).all()
        assert 7 in [i for i, _ in index.search(vectors[6], 1)]  # the graph still leads past them
    else:
        assert index.index.ntotal == index.size


def test_the_client_erases_a_person_sync_and_async(server):
    with ReIDClient(server.url) as reid:
        reid.enroll([image_bytes(8100, v) for v in range(2)], person_id="gone/1")
        assert reid.erase_person("gone/1") == 2
        with pytest.raises(ReIDError) as error:
            reid.erase_person("gone/1")
        assert (error.value.status, error.value.code) == (404, "not_found")
        with pytest.raises(ReIDError) as error:
            reid.erase_person("tab\there")
        assert (error.value.status, error.value.code) == (422, "invalid_request")

    async def run():
        async with AsyncReIDClient(server.url) as reid:
            await reid.enroll([image_bytes(8101, 0)], person_id="gone%2")
            return await reid.erase_person("gone%2"), [i async for i in reid.iter_gallery(person_id="gone%2")]

    assert asyncio.run(run()) == (1, [])


# -- retention


def age_rows(store: Path, ids: List[int], seconds: float) -> None:
    """Make items look enrolled ``seconds`` earlier (their created_at), as if the server had been running that long."""
    db = sqlite3.connect(store)
    with db:
        db.executemany("UPDATE items SET created_at = created_at - ? WHERE id = ?", [(seconds, i) for i in ids])
    db.close()


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_retention_erases_old_items_at_start_and_on_schedule_and_keeps_new_ones(tiny_model, tmp_path):
    store, days = tmp_path / "gallery.sqlite3", 0.002  # 172.8 s
    span = days * 86400
    now = time.time()
    old_blobs, soon_blobs = [image_bytes(9000, v) for v in range(2)], [image_bytes(9001, 0)]
    with ServiceProcess(tiny_model[1], store) as server, server.client() as client:  # no retention yet
        fresh = enroll(client, [image_bytes(9002, 0)], person_id="fresh") + enroll(
            client, [image_bytes(9002, 1)], captured_at=str(now - 60)
        )
        old_unknown = enroll(client, old_blobs[:1], person_id="old unknown")  # aged below: goes by created_at
        old_captured = enroll(client, old_blobs[1:], person_id="old captured", captured_at=str(now - 2 * span))
    old = old_unknown + old_captured
    age_rows(store, old_unknown, 2 * span)
    needles = needles_of(old_blobs, stored_features(store, old), "old unknown", "old captured")

    with (
        ServiceProcess(tiny_model[1], store, retention_days=days, retention_interval_s=0.3) as server,
        server.client() as client,
    ):
        assert listed(client) == fresh  # purged before the server was ready
        assert traces(store, needles) == {}
        assert_error(
            client.post("/gallery", files=files(image_bytes(9003, 0)), data={"captured_at": str(now - 2 * span)}),
            422,
            "invalid_request",
        )  # already past retention: never stored
        [soon] = enroll(client, soon_blobs, person_id="soon", captured_at=str(time.time() - span + 2))  # expires in 2 s
        soon_needles = needles_of(soon_blobs, stored_features(store, [soon]), "soon")
        assert soon in listed(client)
        # by the schedule; the index is updated after the WAL is wiped, so once it is, the files are clean
        wait_until(lambda: client.get("/readyz").json()["index"]["size"] == len(fresh))
        assert listed(client) == fresh and not set(match_ids(client, soon_blobs[0])) & {soon, *old}
        assert client.get("/readyz").json()["gallery_size"] == len(fresh)
        assert (
            'reid_erased_items_total{reason="retention"} 3.0' in client.get("/metrics").text
        )  # 2 at start, 1 on schedule
        assert traces(store, soon_needles) == {}
    vacuum(store)
    assert traces(store, {**needles, **soon_needles}) == {}


# -- a gallery file from before capture times


def test_a_gallery_file_from_before_capture_times_is_migrated_and_keeps_working(tiny_model, tmp_path):
    store = tmp_path / "old.sqlite3"
    blobs = [image_bytes(9500, v) for v in range(2)]
    [vectors] = onnx_outputs(tiny_model[1], blobs, ["embedding"])
    db = sqlite3.connect(store)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)  # the first release's schema: no captured_at, user_version 0
    with db:
        db.executemany(
            "INSERT INTO items(person_id, camera_id, metadata, image, image_format, width, height, "
            "embedding, created_at)"
            " VALUES (?, 'c1', '{}', ?, 'JPEG', 20, 40, ?, ?)",
            [
                (f"old{i}", blob, np.asarray(v, np.float32).tobytes(), NOON)
                for i, (blob, v) in enumerate(zip(blobs, vectors))
            ],
        )
    db.close()

    with ServiceProcess(tiny_model[1], store) as server, server.client() as client:
        items = client.get("/gallery").json()["items"]
        assert [(i["person_id"], i["captured_at"], i["created_at"]) for i in items] == [
            ("old0", None, NOON),
            ("old1", None, NOON),
        ]
        assert match_ids(client, blobs[1])[0] == items[1]["id"]
        [new] = enroll(client, [image_bytes(9501, 0)], captured_at="2024-06-01T12:00:00Z")
        assert listed(client, captured_after="2024-01-01T00:00:00Z") == [new]
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with ServiceProcess(tiny_model[1], store) as server, server.client() as client:  # and opens again as it is
        assert len(listed(client)) == 3


@pytest.mark.parametrize(
    "spelling, canonical", [("4711 ", "4711"), (" 4711", "4711"), ("４７１１", "4711"), ("ﬁve", "five")]
)
def test_an_id_that_looks_like_another_is_refused_so_erasure_reaches_every_enrolled_spelling(
    client, spelling, canonical
):
    """A trailing space, fullwidth digits or a ligature made a second person that DELETE /persons/{canonical}
    missed: such spellings are refused at enrolment, naming the canonical one, and nothing is written."""
    before = client.get("/gallery").json()["total"]
    refused = client.post("/gallery", files=files(image_bytes(4711, 1)), data={"person_id": spelling})
    assert_error(refused, 422, "invalid_request")
    assert repr(canonical) in refused.json()["error"]["message"]
    assert client.get("/gallery").json()["total"] == before


def test_invisible_characters_in_an_id_are_refused_and_searches_take_canonical_ids_only(client):
    for spelling in ("47\u200b11", "\u200d4711", "4711\u2066"):
        assert_error(
            client.post("/gallery", files=files(image_bytes(4711, 1)), data={"camera_id": spelling}),
            422,
            "invalid_request",
        )
    assert_error(
        client.post("/query", files={"image": ("q.jpg", image_bytes(4711, 1))}, data={"camera_id": "cam 1 "}),
        422,
        "invalid_request",
    )
    enroll(client, [image_bytes(4712, 1)], person_id="Bob")  # case is part of the id: Bob and bob are two people
    assert_error(client.delete("/persons/bob"), 404, "not_found")
    assert client.delete("/persons/Bob").json()["removed"] == 1


@pytest.mark.parametrize("field", ["person_id", "camera_id", "metadata"])
def test_form_fields_that_are_not_utf8_text_are_refused_not_stored_as_mojibake(client, field):
    """Starlette decodes such bytes as Latin-1: "\xc3(" became "Ã(" in the gallery."""
    before = client.get("/gallery").json()["total"]
    value = b'{"a": "\xc3("}' if field == "metadata" else b"47\xc3(11"
    assert_error(client.post("/gallery", files=files(image_bytes(4713, 1)), data={field: value}), 400, "invalid_body")
    assert client.get("/gallery").json()["total"] == before


def test_ids_in_urls_that_are_not_utf8_text_are_refused(client):
    """A URL's bytes that are not UTF-8 arrive as U+FFFD, which no id may hold."""
    assert_error(client.get("/gallery?person_id=47%C3%2811"), 422, "invalid_request")
