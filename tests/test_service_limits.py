"""No request may hurt another (issue 12, items 4-7), against real uvicorn servers: memory per request,
authentication and cross-site writes decided before the body is read, EXIF orientation, slow clients."""

import http.client
import io
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from model_zoo.preprocess import DecodeBudgetExceeded, decode_for_model, load_for_model
from service.log_throttle import RepeatThrottle
from tests.conftest import person_image
from harness.server import ServiceProcess

pytestmark = pytest.mark.slow
HEIGHT, WIDTH = 64, 32  # the tiny model's input


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def blocks(side: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A side x side image of nine flat colour blocks: a few kB that decode to side^2 pixels."""
    colours = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return encode(Image.fromarray(colours).resize((side, side), Image.NEAREST), fmt)


def files(*blobs, name="images"):
    return [(name, (f"img{i}", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def peak_rss_mb(server: ServiceProcess) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


# -- raw HTTP, for clients that misbehave on purpose --------------------------------------------------------


def connect(server: ServiceProcess, data: bytes = b"", client: str = "127.0.0.1") -> socket.socket:
    """A raw connection from ``client``, an address of the loopback network (127.0.0.0/8), each another client."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(client, 0))
    sock.sendall(data)
    return sock


def read_response(sock: socket.socket):
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.headers, response.read()


def seconds_until_closed(sock: socket.socket, limit: float = 15) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def request_head(method: str, path: str, length: int, port: int, *extra: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: multipart/form-data; boundary=b",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def multipart(blob: bytes) -> bytes:
    return (
        b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        + blob
        + b"\r\n--b--\r\n"
    )


# -- 4. memory: decode small, release at once, bound the pixels per request and the heatmap work -----------


def test_a_large_jpeg_decodes_scaled_down_to_nearly_the_full_decodes_pixels():
    noise = np.random.default_rng(0).integers(0, 256, (300, 150, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).resize((1500, 3000), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    data = encode(photo, "JPEG", quality=92)
    decoded = decode_for_model(data, 256, 128, preview=True)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((128, 256), Image.BILINEAR)).astype(int)
    difference = np.abs(decoded.pixels.astype(int) - full)
    assert decoded.decoded_pixels == 750 * 1500 < 1500 * 3000 and (decoded.width, decoded.height) == (1500, 3000)
    assert difference.mean() < 0.5 and difference.max() <= 3
    assert decoded.preview.size == (128, 256)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK"])
def test_images_the_model_sees_at_their_size_decode_exactly_as_before(mode):
    # the reference is the previous decode: convert to RGB, then resize; bilevel and grey are now resized first
    image = person_image(3, 4, size=(150, 300)).convert(mode)
    data = encode(image, "JPEG" if mode == "CMYK" else "PNG" if mode != "RGB" else "JPEG")
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((128, 256), Image.BILINEAR))
    np.testing.assert_array_equal(load_for_model(data, 256, 128), reference)


def test_the_pixel_budget_is_checked_before_decoding():
    with pytest.raises(DecodeBudgetExceeded):
        decode_for_model(blocks(1000), HEIGHT, WIDTH, max_decoded_pixels=999_999)
    assert decode_for_model(blocks(1000), HEIGHT, WIDTH, max_decoded_pixels=1_000_000).decoded_pixels == 1_000_000


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("limits") / "gallery.sqlite3"
    settings = dict(max_request_pixels=80_000_000, max_heatmap_matches=2, allowed_origins="https://app.example")
    with ServiceProcess(tiny_model[1], store, **settings) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def test_compressed_large_images_are_decoded_one_at_a_time(server, client):
    # 8 PNGs of 3000x3000 (a few kB each) decode to 36 MB each in PIL: held together they took 290 MB and more
    before = peak_rss_mb(server)
    response = client.post("/gallery", files=files(*[blocks(3000, seed) for seed in range(8)]))
    assert response.status_code == 201, response.text
    assert [(i["width"], i["height"]) for i in response.json()["items"]] == [(3000, 3000)] * 8
    assert peak_rss_mb(server) - before < 150


def test_a_request_past_its_pixel_budget_is_refused_and_writes_nothing(client):
    total = client.get("/gallery").json()["total"]
    assert_error(
        client.post("/gallery", files=files(*[blocks(3000, seed) for seed in range(9)])), 413, "too_many_pixels"
    )
    assert client.get("/gallery").json()["total"] == total
    # large JPEGs count at the scale they decode at: 20 of 4000x4000 (320 MP) decode 20 x 500x500
    response = client.post("/gallery", files=files(*[blocks(4000, seed, "JPEG") for seed in range(20)]))
    assert response.status_code == 201, response.text


def test_heatmaps_only_for_the_first_matches_and_overlays_stay_small(client):
    enrolled = client.post(
        "/gallery", files=files(*[encode(person_image(60, v, size=(1000, 2000)), "JPEG") for v in range(4)])
    )
    assert enrolled.status_code == 201, enrolled.text
    body = client.post(
        "/query",
        files=files(encode(person_image(60, 0, size=(1000, 2000)), "JPEG"), name="image"),
        data={"top_k": 5, "overlays": "true"},
    ).json()
    assert body["heatmap_matches"] == 2
    assert [m["heatmap"] is not None for m in body["matches"]] == [True, True, False, False, False]
    for heatmap in [body["query_heatmap"]] + [m["heatmap"] for m in body["matches"][:2]]:
        overlay = Image.open(io.BytesIO(__import__("base64").b64decode(heatmap["overlay_png"])))
        assert max(overlay.size) <= 256
    assert (
        client.post(
            "/query", files=files(encode(person_image(60, 0), "JPEG"), name="image"), data={"heatmaps": "false"}
        ).json()["heatmap_matches"]
        == 0
    )


# -- 5. the API key before the body; no writes from other web sites ----------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    with ServiceProcess(
        tiny_model[1], tmp_path_factory.mktemp("keyed") / "gallery.sqlite3", api_key="s3cret"
    ) as process:
        yield process


@pytest.mark.parametrize("length", [5_000_000, 300_000_000])
def test_without_the_key_the_body_is_never_waited_for(keyed, length):
    # a few bytes of a body announced as megabytes: a server that reads the body first would wait for the rest
    sock = connect(keyed, request_head("POST", "/gallery", length, keyed.port) + b"--b\r\n")
    started = time.monotonic()
    status, _, body = read_response(sock)
    sock.close()
    assert status == 401 and b'"unauthorized"' in body
    assert time.monotonic() - started < 2


def test_without_the_key_a_broken_multipart_body_is_a_401_not_a_parse_error(keyed):
    with keyed.client() as c:
        for response in (
            c.post("/gallery", content=b"garbage", headers={"content-type": "multipart/form-data"}),
            c.post("/query", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}),
        ):
            assert_error(response, 401, "unauthorized")
        assert c.get("/healthz").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/gallery", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_writes_from_other_web_sites_are_refused(server, client):
    total = client.get("/gallery").json()["total"]
    blob = encode(person_image(70, 1), "JPEG")
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://localhost:{server.port}", "Sec-Fetch-Site": "cross-site"},
    ):
        assert_error(client.post("/gallery", files=files(blob), headers=headers), 403, "cross_site_request")
        assert_error(client.post("/query", files=files(blob, name="image"), headers=headers), 403, "cross_site_request")
    assert_error(client.delete("/gallery/1", headers={"Origin": "https://evil.example"}), 403, "cross_site_request")
    assert client.get("/gallery").json()["total"] == total
    assert client.get("/gallery", headers={"Origin": "https://evil.example"}).status_code == 200  # reads: CORS decides


def test_same_origin_pages_allowed_origins_and_non_browser_clients_may_write(server, client):
    blob = encode(person_image(71, 1), "JPEG")
    for headers in ({}, {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}, {"Origin": "https://app.example"}):
        response = client.post("/gallery", files=files(blob), headers=headers)
        assert response.status_code == 201, response.text
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    preflight = client.options(
        "/gallery",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert preflight.status_code == 200 and "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    assert (
        "access-control-allow-origin" not in client.get("/gallery", headers={"Origin": "https://evil.example"}).headers
    )


# -- 6. EXIF orientation -----------------------------------------------------------------------------------


def sideways_with_exif(upright: Image.Image) -> bytes:
    """What a phone stores: the pixels on their side, and EXIF Orientation 6 (turn 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


def test_an_exif_rotated_photo_decodes_upright():
    upright = person_image(80, 1, size=(128, 256))
    plain = decode_for_model(encode(upright, "JPEG", quality=95, subsampling=0), 256, 128)
    rotated = decode_for_model(sideways_with_exif(upright), 256, 128)
    assert (rotated.width, rotated.height) == (128, 256)
    assert np.abs(rotated.pixels.astype(int) - plain.pixels).mean() < 2
    sideways = np.asarray(upright.transpose(Image.Transpose.ROTATE_90).resize((128, 256), Image.BILINEAR)).astype(int)
    assert np.abs(sideways - plain.pixels).mean() > 10  # what the model was fed before


def test_an_exif_rotated_query_matches_its_upright_enrolment(client):
    upright = person_image(81, 1, size=(128, 256))
    [item] = client.post("/gallery", files=files(encode(upright, "JPEG", quality=95, subsampling=0))).json()["items"]
    [rotated] = client.post("/gallery", files=files(sideways_with_exif(upright))).json()["items"]
    assert (rotated["width"], rotated["height"]) == (128, 256)
    matches = client.post(
        "/query", files=files(sideways_with_exif(upright), name="image"), data={"heatmaps": "false", "top_k": 2}
    ).json()["matches"]
    assert {m["id"] for m in matches} == {item["id"], rotated["id"]}
    assert min(m["score"] for m in matches) > 0.99


# -- 7. slow clients, large headers, too many connections --------------------------------------------------


@pytest.fixture(scope="module")
def strict(tiny_model, tmp_path_factory):
    settings = dict(
        header_timeout_s=2,
        body_timeout_s=2,
        max_header_bytes=4096,
        max_connections=4,
        max_connections_per_client=3,
        min_body_bytes_per_s=200,
    )
    with ServiceProcess(tiny_model[1], tmp_path_factory.mktemp("strict") / "gallery.sqlite3", **settings) as process:
        yield process


@pytest.mark.parametrize("sent", [b"", b"POST /gallery HTTP/1.1\r\nHost: x\r\n"])
def test_a_client_that_never_finishes_its_headers_is_disconnected(strict, sent):
    assert 1.5 < seconds_until_closed(connect(strict, sent)) < 5


def test_a_stalled_body_is_disconnected(strict):
    sock = connect(strict, request_head("POST", "/gallery", 10_000, strict.port) + b"--b\r\n")
    assert 1.5 < seconds_until_closed(sock) < 5


def test_a_trickling_body_is_disconnected(strict):
    """A file part's bytes one every 0.3 s never pause for the body timeout, but stay far under the minimum
    rate: the connection is cut while the body is still coming, with no answer."""
    part = b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    sock = connect(strict, request_head("POST", "/gallery", 10_000, strict.port) + part)
    sock.setblocking(False)
    started, answer = time.monotonic(), b""
    try:
        while time.monotonic() - started < 10:
            sock.sendall(b"x")
            time.sleep(0.3)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            answer += chunk
            if not chunk:
                break
    except OSError:  # closed by the server
        pass
    sock.close()
    assert 1.5 < time.monotonic() - started < 6 and answer == b""


def test_a_slow_but_steady_body_is_served(strict):
    body = multipart(encode(person_image(90, 1), "JPEG"))
    sock = connect(strict, request_head("POST", "/gallery", len(body), strict.port))
    pieces = np.array_split(np.frombuffer(body, np.uint8), 6)
    for piece in pieces:  # 3 s in all, longer than either timeout, never pausing 2 s
        time.sleep(0.5)
        sock.sendall(piece.tobytes())
    status, _, answer = read_response(sock)
    sock.close()
    assert status == 201, answer


@pytest.mark.parametrize("end", [b"\r\n\r\n", b""])  # whole, or still coming (the parser would buffer them)
def test_oversized_headers_are_refused_with_431(strict, end):
    sock = connect(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 8000 + end)
    status, _, body = read_response(sock)
    sock.close()
    assert status == 431 and b'"headers_too_large"' in body


def test_many_small_pipelined_requests_in_one_write_are_each_answered(strict):
    """4,000 requests, 136 kB in one write: each request's headers are small, so none is refused."""
    request, count = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 4000
    sock = socket.create_connection(("127.0.0.1", strict.port), timeout=30)
    sender = threading.Thread(target=sock.sendall, args=(request * count,))
    sender.start()
    answers = b""
    while answers.count(b"HTTP/1.1 200") < count and (chunk := sock.recv(1 << 20)):
        answers += chunk
    sender.join()
    sock.close()
    assert answers.count(b"HTTP/1.1 200") == count and b"headers_too_large" not in answers


def test_unparsable_http_is_a_400_in_the_error_shape(strict):
    sock = connect(strict, b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, body = read_response(sock)
    sock.close()
    assert status == 400 and headers["content-type"] == "application/json" and b'"invalid_http"' in body


def test_bad_requests_cannot_flood_the_log(strict):
    """uvicorn logs a WARNING per unparsable request: 50 of them write it once (per 10 s), not 50 times."""
    for _ in range(50):
        sock = connect(strict, b"NOT HTTP AT ALL\r\n\r\n")
        assert read_response(sock)[0] == 400
        sock.close()
    assert strict.output().count("Invalid HTTP request received.") <= 2


def test_a_throttled_message_says_how_many_were_held_back():
    now = [0.0]
    throttle = RepeatThrottle(window_s=10, clock=lambda: now[0])

    def record():
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "bad request from %s", ("x",), None)

    assert [throttle.filter(record()) for _ in range(4)] == [True, False, False, False]
    now[0] = 11.0
    passed = record()
    assert throttle.filter(passed) and passed.getMessage() == "bad request from x (3 more like this held back)"


def test_the_connection_limit_is_honoured(strict):
    idle = [connect(strict, client=f"127.0.0.{10 + i}") for i in range(4)]
    try:
        time.sleep(0.2)
        status, headers, body = read_response(
            connect(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", client="127.0.0.20")
        )
        assert status == 503 and b'"overloaded"' in body and headers["connection"] == "close"
        assert b"REID_MAX_CONNECTIONS=4" in body
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    with strict.client() as c:
        assert c.get("/healthz").status_code == 200


def test_one_client_cannot_take_every_connection(strict):
    """Past its own cap a client's new connections are refused, while another client is still served."""
    idle = [connect(strict, client="127.0.0.30") for _ in range(3)]
    try:
        time.sleep(0.2)
        status, _, body = read_response(
            connect(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", client="127.0.0.30")
        )
        assert status == 503 and b"REID_MAX_CONNECTIONS_PER_CLIENT=3" in body
        status, _, _ = read_response(connect(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", client="127.0.0.31"))
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    status, _, _ = read_response(connect(strict, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", client="127.0.0.30"))
    assert status == 200


def test_a_slow_app_is_never_mistaken_for_a_slow_client(tmp_path):
    """In-process uvicorn with the same protocol: an app that takes longer than both timeouts to read a
    body sent at once, and to answer, is served."""
    import asyncio

    import uvicorn

    from service.server import protocol_class
    from service.settings import Settings
    from harness.server import free_port

    async def slow_app(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(1.5)  # the body waits in uvicorn's buffer and the socket's, reading paused
        size, more = 0, True
        while more:
            message = await receive()
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        await asyncio.sleep(1.5)
        body = str(size).encode()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
        )
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    limits = Settings(header_timeout_s=0.5, body_timeout_s=0.5)
    server = uvicorn.Server(
        uvicorn.Config(
            slow_app,
            host="127.0.0.1",
            port=port,
            http=protocol_class(limits),
            ws="none",
            lifespan="off",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        payload = b"x" * 2_000_000
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        status, _, body = read_response(sock)
        sock.close()
        assert (status, body) == (200, str(len(payload)).encode())
    finally:
        server.should_exit = True
        thread.join(10)
