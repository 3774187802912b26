"""Bad input never poisons the gallery and no request hurts another (issue 12): a real uvicorn process on
loopback, the tiny exported model, a real SQLite file."""

import io
import json
import socket
import sqlite3
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.http_contract import image_headers
from service.settings import Settings
from service.store import GalleryStore, NewItem
from service.validation import MAX_METADATA_DEPTH, UNREADABLE_KEY
from tests.conftest import image_bytes
from tests.cluster import BACKENDS, backend_settings
from harness.server import ServiceProcess
from tests.test_service_api import enroll, files

pytestmark = pytest.mark.slow
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("hardening") / "gallery.sqlite3"
    with ServiceProcess(
        tiny_model[1],
        store,
        max_image_bytes=300_000,
        max_images_per_request=16,
        max_top_k=20,
        **backend_settings(request),
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def assert_error(response, status, code=None):
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def gallery_ids(client) -> list:
    page = client.get("/gallery", params={"limit": 500}).json()
    return [item["id"] for item in page["items"]]


def nested(depth: int) -> str:
    """A metadata object ``depth`` levels deep, counting the object itself."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# -- 1. metadata and ids that could not be written back are refused before any write


@pytest.mark.parametrize(
    "metadata",
    [
        '{"a": "\\ud800"}',
        '{"\\udc00": 1}',
        '{"a": ["x", "\\ud83d"]}',  # lone surrogates, in a value, a key, a list
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": -Infinity}',
        '{"a": 1e400}',
        '{"a": -1e999}',  # not finite
        nested(MAX_METADATA_DEPTH + 1),
        nested(300),
        nested(5000),  # deeper than the documented limit, under the size limit
    ],
)
def test_metadata_that_cannot_be_written_back_is_refused_and_nothing_is_written(client, metadata):
    before = gallery_ids(client)
    response = client.post("/gallery", files=files(image_bytes(11, 1), image_bytes(11, 2)), data={"metadata": metadata})
    assert_error(response, 422, "invalid_metadata")
    assert gallery_ids(client) == before


def test_metadata_at_the_limits_round_trips(client):
    values = {
        "deep": json.loads(nested(MAX_METADATA_DEPTH))["a"],
        "emoji": "\U0001f600",
        "big": 10**30,
        "small": 1e-300,
        "nul": "a\u0000b",
        "none": None,
    }
    [item_id] = enroll(client, [image_bytes(12, 1)], metadata=json.dumps(values))
    assert client.get(f"/gallery/{item_id}").json()["metadata"] == values


@pytest.mark.parametrize(
    "field, value",
    [
        ("person_id", "a\u0000b"),
        ("person_id", "tab\there"),
        ("camera_id", "cam\n1"),
        ("camera_id", "\u007f"),
        ("person_id", "\u0085"),
    ],
)
def test_ids_with_control_characters_are_refused(client, field, value):
    before = gallery_ids(client)
    assert_error(client.post("/gallery", files=files(image_bytes(13, 1)), data={field: value}), 422, "invalid_request")
    assert gallery_ids(client) == before


def test_an_id_sent_as_a_utf8_encoded_surrogate_is_refused(server, client):
    # UTF-8 cannot carry U+D800; its would-be bytes ED A0 80 are not UTF-8: a form field that is not text is
    # refused whole (service.multipart), before any id rule.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="person_id"\r\n\r\n\xed\xa0\x80\r\n'
        b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        + image_bytes(13, 2)
        + b"\r\n--b--\r\n"
    )
    before = gallery_ids(client)
    assert_error(
        client.post("/gallery", content=body, headers={"content-type": "multipart/form-data; boundary=b"}),
        400,
        "invalid_body",
    )
    assert gallery_ids(client) == before


# what an older version stored, or another tool: each must still be read, listed and matched
POISONED_METADATA = ['{"a": NaN}', '{"a": "\\ud800"}', nested(400), "not json", "[1, 2]"]


def test_stored_rows_that_cannot_be_served_as_they_are_are_answered_safely(tiny_model, tmp_path):
    store = tmp_path / "g.sqlite3"
    with ServiceProcess(tiny_model[1], store) as process, process.client() as c:
        ids = enroll(c, [image_bytes(20 + i, 1) for i in range(len(POISONED_METADATA) + 1)])
    db = sqlite3.connect(store)
    with db:
        for item_id, text in zip(ids, POISONED_METADATA):
            db.execute("UPDATE items SET metadata = ? WHERE id = ?", (text, item_id))
        db.execute(
            "UPDATE items SET person_id = CAST(x'ff41' AS TEXT), camera_id = CAST(x'c0' AS TEXT) WHERE id = ?",
            (ids[-1],),
        )
    db.close()
    with ServiceProcess(tiny_model[1], store) as process, process.client() as c:
        page = c.get("/gallery", params={"limit": 500})
        assert page.status_code == 200, page.text
        by_id = {item["id"]: item for item in page.json()["items"]}
        for item_id, text in zip(ids, POISONED_METADATA):
            item = c.get(f"/gallery/{item_id}")
            assert item.status_code == 200, item.text
            assert item.json()["metadata"] == by_id[item_id]["metadata"] == {UNREADABLE_KEY: text}
        assert c.get(f"/gallery/{ids[-1]}").json()["person_id"] == "\ufffdA"  # the bad byte as U+FFFD
        query = c.post("/query", files=files(image_bytes(20, 1), name="image"), data={"top_k": str(len(ids))})
        assert query.status_code == 200, query.text
        assert {m["id"] for m in query.json()["matches"]} == set(ids)


# -- 2. ids are checked at the edge, and one request's failing write never fails the others in its group


@pytest.fixture(scope="module")
def two_digit_id(client) -> int:
    """An item whose id has two digits or more, so that "1_0"-like spellings of it exist."""
    return enroll(client, [image_bytes(30, v) for v in range(10)])[-1]


@pytest.mark.parametrize(
    "spelling",
    ["9223372036854775808", "99999999999999999999999", "+{id}", "{id_}", "0{id}", "0", "-1", "%20{id}", "1e1"],
)
def test_ids_out_of_range_or_not_plain_digits_are_refused(client, two_digit_id, spelling):
    item_id = two_digit_id
    text = str(item_id)
    path_id = spelling.format(id=item_id, id_=f"{text[0]}_{text[1:]}")
    for response in (
        client.get(f"/gallery/{path_id}"),
        client.get(f"/gallery/{path_id}/image"),
        client.delete(f"/gallery/{path_id}"),
    ):
        assert_error(response, (404, 422))
    assert client.get(f"/gallery/{item_id}").status_code == 200  # "1_0" never deleted item 10


def test_the_largest_id_is_a_plain_404(client):
    assert_error(client.get(f"/gallery/{INT64_MAX}"), 404, "not_found")
    assert_error(client.delete(f"/gallery/{INT64_MAX}"), 404, "not_found")


def test_honest_enrolments_all_succeed_beside_concurrent_bad_requests(server):
    bad = [
        lambda c: c.delete("/gallery/9223372036854775808"),
        lambda c: c.get("/gallery/18446744073709551616"),
        lambda c: c.delete("/gallery/1_0"),
        lambda c: c.post("/gallery", files=files(image_bytes(40, 1)), data={"metadata": '{"a": "\\udfff"}'}),
        lambda c: c.post("/gallery", files=files(image_bytes(40, 2)), data={"metadata": '{"a": 1e400}'}),
        lambda c: c.post("/gallery", files=files(image_bytes(40, 3)), data={"person_id": "x\u0000"}),
    ]
    honest, problems = [], []

    def enrol(worker):
        with server.client() as c:
            for n in range(5):
                response = c.post(
                    "/gallery", files=files(image_bytes(500 + worker, n)), data={"person_id": f"h{worker}"}
                )
                (
                    honest.extend(response.json()["ids"])
                    if response.status_code == 201
                    else problems.append(response.text)
                )

    def attack(worker):
        with server.client() as c:
            for n in range(10):
                response = bad[(worker + n) % len(bad)](c)
                if not 400 <= response.status_code < 500 or set(response.json()) != {"error"}:
                    problems.append(f"{response.status_code} {response.text}")

    threads = [threading.Thread(target=enrol, args=(w,)) for w in range(4)] + [
        threading.Thread(target=attack, args=(w,)) for w in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == [] and len(honest) == 20
    with server.client() as c:
        assert all(c.get(f"/gallery/{i}").status_code == 200 for i in honest)


def test_a_write_that_fails_in_a_group_commit_is_rolled_back_alone(tmp_path):
    store = GalleryStore(tmp_path / "g.sqlite3")
    new = partial(NewItem, b"img", "JPEG", 1, 1, np.zeros(4, np.float32))
    results = store.commit_group(
        [
            partial(store.insert, [new("a")]),
            partial(store.remove, 2**63),  # OverflowError
            partial(store.insert, [new("b"), new("\ud800")]),  # UnicodeEncodeError on its 2nd row
            partial(store.insert, [new(metadata={"x": float("nan")})]),  # refused by the store's own check
            partial(store.insert, [new("c")]),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "list",
        "OverflowError",
        "UnicodeEncodeError",
        "InvalidValue",
        "list",
    ]
    assert store.count() == 2 and [i.person_id for i in store.list(10, 0)[1]] == ["a", "c"]
    store.close()


def memory_mb(process: ServiceProcess, field: str) -> float:
    """VmRSS (resident now) or VmHWM (the peak) of the server's process, in MB."""
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024


def test_concurrent_decompression_bombs_share_one_decode_budget(tiny_model, tmp_path):
    """Six 1.4 kB lossless 6000x6000 WebPs at once: each decode peaks near 580 MB, so together they took 3.8 GB,
    and the freed buffers stayed resident. They now queue for REID_MAX_DECODE_MB and give memory back."""
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (30, 60, 90)).save(buffer, format="WEBP", lossless=True)
    bomb = buffer.getvalue()
    with ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3", max_decode_mb=700) as server:
        before = memory_mb(server, "VmRSS")

        def enrol(_):
            with server.client() as c:
                return c.post("/gallery", files=[("images", ("bomb.webp", bomb, "image/webp"))]).status_code

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(enrol, range(6))) == [201] * 6
        assert memory_mb(server, "VmHWM") - before < 700 + 200
        assert memory_mb(server, "VmRSS") - before < 150


def test_heatmaps_never_decode_a_costly_stored_image_again(tiny_model, tmp_path):
    """A 3 MP PNG has no reduced decode: drawing its heatmap decoded it in full on every query (ten 6300x6300
    ones took 4 s a query). Its model pixels and preview are kept at enrolment; to prove the original is not
    decoded again, it is overwritten with bytes that cannot be decoded, and the heatmap is still exact."""
    gradient = np.linspace(0, 255, 2000 * 1500 * 3).reshape(1500, 2000, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    large, store = buffer.getvalue(), tmp_path / "g.sqlite3"
    with ServiceProcess(tiny_model[1], store, heatmap_cache_mb=0) as server, server.client() as c:
        [large_id] = enroll(c, [large])
        [small_id] = enroll(c, [image_bytes(77, 1)])
    db = sqlite3.connect(store)
    assert [row[0] is None for row in db.execute("SELECT derived FROM items ORDER BY id")] == [False, True]
    db.execute("UPDATE items SET image = ? WHERE id = ?", (b"not an image", large_id))
    db.commit()
    db.close()
    with ServiceProcess(tiny_model[1], store, heatmap_cache_mb=0) as server, server.client() as c:
        response = c.post("/query", files={"image": ("q.png", large, "image/png")}, data={"top_k": "2"})
        assert response.status_code == 200, response.text
        [match] = [m for m in response.json()["matches"] if m["id"] == large_id]
        assert match["score"] == pytest.approx(1.0, abs=1e-5)
        assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-4)
        assert small_id in [m["id"] for m in response.json()["matches"]]


def test_a_store_made_without_auto_vacuum_is_rewritten_with_it_and_keeps_its_items(tmp_path):
    """Deletes can only give space back to a full disk with auto_vacuum, which an older version did not set."""
    store = GalleryStore(tmp_path / "g.sqlite3")
    store.commit_group([partial(store.insert, [NewItem(b"img", "JPEG", 1, 1, np.zeros(4, np.float32), "a")])])
    store.writer.executescript("PRAGMA auto_vacuum=NONE; VACUUM")
    store.close()
    store = GalleryStore(tmp_path / "g.sqlite3")
    assert store.writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert [i.person_id for i in store.list(10, 0)[1]] == ["a"]
    store.close()


# -- 3. after a 500 the connection is closed cleanly


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_500_says_connection_close_and_the_next_request_is_answered(tiny_model, tmp_path):
    store = tmp_path / "g.sqlite3"
    with ServiceProcess(tiny_model[1], store) as process, process.client() as c:
        [item_id] = enroll(c, [image_bytes(50, 1)])
    with sqlite3.connect(store) as db:  # corrupted by hand: a width that is no number cannot be answered
        db.execute("UPDATE items SET width = 'wide' WHERE id = ?", (item_id,))
    with ServiceProcess(tiny_model[1], store) as process:
        with process.client() as c:
            for _ in range(5):
                response = c.get(f"/gallery/{item_id}")
                assert_error(response, 500, "internal")
                assert response.headers["connection"] == "close"
                assert c.get("/healthz").status_code == 200  # on a new connection, no reset
        pipelined = raw_exchange(
            process.port,
            f"GET /gallery/{item_id} HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        assert (
            pipelined.startswith(b"HTTP/1.1 500")
            and b"connection: close" in pipelined.lower()
            and pipelined.endswith(b'"internal error"}}')
        )


# -- 8. smaller contract points


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("PUT", "/gallery", "GET, HEAD, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PATCH", "/gallery/1", "DELETE, GET, HEAD"),
        ("GET", "/query", "POST"),
    ],
)
def test_405_says_what_is_allowed(client, method, path, allow):
    response = client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow


def test_head_answers_like_get_without_a_body(client):
    [item_id] = enroll(client, [image_bytes(60, 1)])
    for path in ("/healthz", "/gallery", f"/gallery/{item_id}", f"/gallery/{item_id}/image", "/openapi.json", "/"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == str(len(got.content))
    assert client.head("/gallery/99999999").status_code == 404


def test_a_body_that_is_not_multipart_is_a_documented_400(client):
    response = client.post("/gallery", content=b"zz", headers={"content-type": "multipart/form-data"})
    assert_error(response, 400, "invalid_body")


def test_no_redirect_takes_its_host_from_the_request(client):
    response = client.get("/gallery/", headers={"Host": "evil.example"})
    assert_error(response, 404, "not_found")
    assert "location" not in response.headers


def test_openapi_declares_image_and_text_content_types_and_the_id_range(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert list(paths["/gallery/{item_id}/image"]["get"]["responses"]["200"]["content"]) == ["image/*"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    [parameter] = paths["/gallery/{item_id}"]["delete"]["parameters"]
    assert (parameter["schema"]["minimum"], parameter["schema"]["maximum"]) == (1, INT64_MAX)


def mpo_bytes() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.open(io.BytesIO(image_bytes(61, v))) for v in (1, 2)]
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def xbm_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(62, 1))).convert("1").save(buffer, format="XBM")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, media_type",
    [
        (lambda: image_bytes(60, 2), "image/jpeg"),
        (lambda: image_bytes(60, 3, "PNG"), "image/png"),
        (mpo_bytes, "image/jpeg"),
        (xbm_bytes, "application/octet-stream"),
    ],
)
def test_images_are_served_with_a_standard_type_and_nosniff(client, make, media_type):
    response = client.post("/gallery", files=files(make()))
    if response.status_code == 400:  # a format the decoder does not take: nothing to serve
        return assert_error(response, 400, "invalid_image")
    [item_id] = response.json()["ids"]
    image = client.get(f"/gallery/{item_id}/image")
    assert image.headers["content-type"] == media_type and image.headers["x-content-type-options"] == "nosniff"


def test_image_types_map_every_pil_format_to_a_standard_one():
    from PIL import Image as PILImage

    PILImage.init()
    for image_format in PILImage.OPEN:
        media_type = image_headers(image_format)["Content-Type"]
        assert media_type in (
            "image/jpeg",
            "image/png",
            "image/gif",
            "image/webp",
            "image/bmp",
            "image/tiff",
            "image/avif",
            "application/octet-stream",
        ), (image_format, media_type)


@pytest.mark.parametrize(
    "setting",
    [
        dict(max_queued_images=8, max_images_per_request=9),
        dict(max_queued_images=50, max_images_per_request=50, max_heatmap_matches=51),
    ],
)
def test_settings_where_one_request_could_never_be_queued_are_refused(setting):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="REID_MAX_QUEUED_IMAGES"):
        Settings(**setting)


def test_the_server_will_not_start_with_such_settings(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="REID_MAX_QUEUED_IMAGES=8 is below"):
        ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3", max_queued_images=8, max_images_per_request=9).start()


def noise_png(seed: int, side: int = 300) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs: a disk that really fills (root only; skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(folder)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(c, seed: int = 0) -> list:
    """Enrol 8 PNGs at a time (seeds from ``seed`` on) until the disk is full; the ids enrolled."""
    ids = []
    while True:  # ~270 kB a PNG, the store keeps a 16 MiB reserve: full after about 24 MiB
        seed += 8
        response = c.post(
            "/gallery", files=[("images", (f"{seed + i}.png", noise_png(seed + i), "image/png")) for i in range(8)]
        )
        if response.status_code != 201:
            assert_error(response, 503, "storage_unavailable")
            return ids
        ids += response.json()["ids"]
        assert len(ids) < 1000, "the disk never filled"


def test_a_full_disk_still_lets_deletes_free_space_every_time(tiny_model, small_disk):
    """Deletes work on a full disk however often it fills: enrolments never take the space the reserve needs."""
    process = ServiceProcess(tiny_model[1], small_disk / "g.sqlite3", max_images_per_request=8)
    process.log_path = small_disk.parent / "server.log"  # not on the disk that fills
    with process, process.client() as c:
        kept = []
        for episode in range(3):
            ids = fill_disk(c, seed=1000 * episode)
            assert ids, f"episode {episode}: nothing enrolled after the deletes"
            for item_id in ids[: len(ids) // 2 + 1]:
                assert c.delete(f"/gallery/{item_id}").status_code == 204, f"episode {episode}"
            kept += ids[len(ids) // 2 + 1 :]
        assert "giving back the 16777216 byte disk reserve" in process.output()  # once per 10 s: repeats are throttled
        for item_id in kept[1:]:  # all but one: the space goes back to the disk, the reserve is laid again
            assert c.delete(f"/gallery/{item_id}").status_code == 204
        assert c.post("/gallery", files=[("images", ("again.png", noise_png(0), "image/png"))]).status_code == 201
        ready = c.get("/readyz").json()
        assert ready["gallery_size"] == ready["index"]["size"] == 2


def test_enrolments_wait_for_the_reserve_after_a_full_disk(tiny_model, small_disk):
    """Freeing less than the reserve needs leaves enrolments refused, with a message that says why."""
    process = ServiceProcess(tiny_model[1], small_disk / "g.sqlite3", max_images_per_request=8)
    process.log_path = small_disk.parent / "server.log"
    with process, process.client() as c:
        ids = fill_disk(c)
        assert c.delete(f"/gallery/{ids[0]}").status_code == 204
        response = c.post("/gallery", files=[("images", ("again.png", noise_png(0), "image/png"))])
        assert_error(response, 503, "storage_unavailable")
        assert "enrolments resume once 24 MiB are free" in response.json()["error"]["message"]
        assert c.delete(f"/gallery/{ids[1]}").status_code == 204


def test_no_answer_may_be_framed_by_another_site(client):
    """Clickjacking: the page's delete buttons inside another site's invisible frame. Every answer, the page,
    the API reference, data and errors alike, forbids framing in both the old and the CSP way."""
    for response in (
        client.get("/"),
        client.get("/docs"),
        client.get("/healthz"),
        client.get("/gallery/999999"),
        client.head("/"),
    ):
        assert response.headers["x-frame-options"] == "DENY", response.url
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'", response.url
