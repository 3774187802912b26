"""What one hostile request can cost the server at most, measured on a real server (not a test).

A real server on the shipped default model (its default limits) meets each request that a probe once used
against it, and this records what the server process spent: its peak and lasting resident memory, its CPU
seconds (user + system, from /proc), the wall time and the answer's bytes.

- ``webp_bombs``: six 1.4 kB lossless 6000x6000 WebPs enrolled at once (each decode peaks near 580 MB);
- ``costly_stored_heatmaps``: heatmap queries whose 10 matches are enrolled 6300x6300 PNGs, beside what
  decoding those 10 originals costs (what each such query paid before their decoded copies were kept);
- ``batch_heatmaps``: one POST /query/batch of 64 images, heatmaps on, top_k=100;
- ``one_client_connections``: 100 idle connections from one address, then a request from another;
- ``pipelined``: 4,000 GET /healthz in one write;
- ``trickle``: a body sent a byte every 0.5 s: seconds until the server cuts it.

    python -m bench.hostile_costs --output bench/results/hostile_costs.json
    python -m bench.hostile_costs --write-docs bench/results/hostile_costs.json   # docs/api.md's table, from the file

docs/api.md holds no hand-copied figure from it: its table sits under ``<!-- hostile costs table: ... -->``,
which ``--write-docs`` rewrites (tests/test_results_tables.py checks it is what the committed file prints).
"""

import argparse
import io
import os
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import DocsTable, emit, generated_marker, jpeg, memory_kb
from model_zoo.provenance import provenance
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.contract import open_cpu_session
from model_zoo.files import sha256_of
from model_zoo.preprocess import decode_for_model
from harness.server import ServiceProcess

TICKS = os.sysconf("SC_CLK_TCK")


class Meter:
    """The server process's CPU seconds, peak and resident memory (MB) over one step."""

    def __init__(self, server: ServiceProcess):
        self.pid = server.process.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime

    def __enter__(self):
        self.rss_before, self.cpu_before, self.started = (
            memory_kb(self.pid, "VmRSS") / 1024,
            self.cpu_s(),
            time.perf_counter(),
        )
        return self

    def __exit__(self, *exc):
        self.figures = {
            "wall_s": round(time.perf_counter() - self.started, 2),
            "cpu_s": round(self.cpu_s() - self.cpu_before, 2),
            "peak_rss_growth_mb": round(memory_kb(self.pid, "VmHWM") / 1024 - self.rss_before),
            "rss_growth_after_mb": round(memory_kb(self.pid, "VmRSS") / 1024 - self.rss_before),
        }


def encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def webp_bombs(server: ServiceProcess) -> dict:
    bomb = encoded(np.full((6000, 6000, 3), (30, 60, 90), np.uint8), "WEBP", lossless=True)

    def enrol(_):
        with server.client() as c:
            return c.post("/gallery", files=[("images", ("bomb.webp", bomb, "image/webp"))], timeout=120).status_code

    with Meter(server) as meter, ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(enrol, range(6)))
    return {"file_bytes": len(bomb), "requests": 6, "statuses": statuses, **meter.figures}


def costly_stored_heatmaps(server: ServiceProcess, size, rounds: int) -> dict:
    """Ten large PNGs of one colour block each (38 kB) are the only items; the query is one of them, shrunk."""
    blocks = [
        np.kron(np.random.default_rng(i).integers(0, 256, (6, 3, 3), np.uint8), np.ones((1050, 2100, 1), np.uint8))
        for i in range(10)
    ]
    pngs = [encoded(b, "PNG", optimize=True) for b in blocks]
    with server.client() as c:  # one a request: ten are more pixels than REID_MAX_REQUEST_PIXELS
        for i, p in enumerate(pngs):
            assert c.post("/gallery", files=[("images", (f"{i}.png", p, "image/png"))], timeout=300).status_code == 201
    query = encoded(np.asarray(Image.fromarray(blocks[0]).resize((64, 128))), "JPEG")
    started = time.perf_counter()
    for p in pngs:
        decode_for_model(p, *size, preview=True)
    decode_10_s = time.perf_counter() - started
    walls = []
    with Meter(server) as meter, server.client() as c:
        for _ in range(rounds):
            begun = time.perf_counter()
            response = c.post(
                "/query", files={"image": ("q.jpg", query, "image/jpeg")}, data={"top_k": "10"}, timeout=120
            )
            walls.append(time.perf_counter() - begun)
            assert response.status_code == 200 and response.json()["heatmap_matches"] == 10, response.text[:200]
    return {
        "png_bytes": statistics.median(len(p) for p in pngs),
        "png_size": [6300, 6300],
        "queries": rounds,
        "query_median_s": round(statistics.median(walls), 3),
        "decoding_the_10_originals_s": round(decode_10_s, 3),
        "cpu_s_per_query": round(meter.figures["cpu_s"] / rounds, 3),
        **meter.figures,
    }


def batch_heatmaps(server: ServiceProcess) -> dict:
    with server.client() as c:
        for start in range(0, 120, 40):
            assert (
                c.post(
                    "/gallery",
                    files=[("images", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(start, start + 40)],
                    timeout=300,
                ).status_code
                == 201
            )
        images = [("images", (f"q{i}.jpg", jpeg(1000 + i), "image/jpeg")) for i in range(64)]
        with Meter(server) as meter:
            response = c.post("/query/batch", files=images, data={"top_k": "100", "heatmaps": "true"}, timeout=600)
    results = response.json()["results"]
    return {
        "status": response.status_code,
        "queries": 64,
        "top_k": 100,
        "answer_bytes": len(response.content),
        "heatmaps_drawn": sum(1 + r["heatmap_matches"] for r in results if r["query_heatmap"]),
        **meter.figures,
    }


def one_client_connections(server: ServiceProcess) -> dict:
    idle = [socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0)) for _ in range(100)]
    time.sleep(0.5)
    refused = 0
    for sock in idle:
        sock.settimeout(0.2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            refused += sock.recv(65536).startswith(b"HTTP/1.1 503")
        except socket.timeout:
            pass
    with socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.3", 0)) as other:
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        served = other.recv(65536).startswith(b"HTTP/1.1 200")
    for sock in idle:
        sock.close()
    return {"connections": len(idle), "refused_503": refused, "another_client_served": served}


def pipelined(server: ServiceProcess, count: int = 4000) -> dict:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with Meter(server) as meter, socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        threading.Thread(target=sock.sendall, args=(request * count,), daemon=True).start()
        answers = b""
        while answers.count(b"HTTP/1.1 200") < count and (chunk := sock.recv(1 << 20)):
            answers += chunk
    return {
        "requests": count,
        "request_bytes": len(request) * count,
        "answered_200": answers.count(b"HTTP/1.1 200"),
        **meter.figures,
    }


def trickle(server: ServiceProcess) -> dict:
    head = (
        f"POST /gallery HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 100000\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'.encode()
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head)
    started, sent = time.monotonic(), 0
    try:
        while time.monotonic() - started < 180:
            sock.sendall(b"x")
            sent += 1
            time.sleep(0.5)
    except OSError:
        pass
    sock.close()
    return {"bytes_per_s": 2, "seconds_until_cut": round(time.monotonic() - started, 1), "bytes_sent": sent}


def costs_table(results: dict) -> str:
    """docs/api.md's table of a result file: per hostile request, what the server spent and what came of it."""

    def row(request: str, case: dict, outcome: str) -> str:
        cells = [case.get(k, "-") for k in ("wall_s", "cpu_s", "peak_rss_growth_mb", "rss_growth_after_mb")]
        return f"| {request} | " + " | ".join(str(c) for c in cells) + f" | {outcome} |"

    bombs, costly, batch = results["webp_bombs"], results["costly_stored_heatmaps"], results["batch_heatmaps"]
    clients, pipelined, trickled = results["one_client_connections"], results["pipelined"], results["trickle"]
    return "\n".join(
        [
            "| hostile request | wall s | server CPU s | peak memory +MB | memory after +MB | outcome |",
            "|---|---|---|---|---|---|",
            row(
                f"{bombs['requests']} lossless 6000x6000 WebPs ({bombs['file_bytes']} B each) enrolled at once",
                bombs,
                f"statuses {sorted(set(bombs['statuses']))}, decoded one after another within REID_MAX_DECODE_MB",
            ),
            row(
                f"{costly['queries']} heatmap queries matching 10 enrolled 6300x6300 PNGs "
                f"({costly['png_bytes'] / 1000:.0f} kB each)",
                costly,
                f"{costly['query_median_s']} s a query (median); decoding the 10 originals takes "
                f"{costly['decoding_the_10_originals_s']} s",
            ),
            row(
                f"POST /query/batch: {batch['queries']} images, top_k={batch['top_k']}, heatmaps",
                batch,
                f"{batch['answer_bytes'] / 1e6:.1f} MB answer, {batch['heatmaps_drawn']} heatmaps drawn",
            ),
            row(
                f"{pipelined['requests']} GET /healthz pipelined in one write ({pipelined['request_bytes'] // 1000} "
                f"kB)",
                pipelined,
                f"{pipelined['answered_200']} answered 200",
            ),
            row(
                f"{clients['connections']} idle connections from one address",
                {},
                f"{clients['refused_503']} refused 503; another client served: {clients['another_client_served']}",
            ),
            row(
                f"a body trickled at {trickled['bytes_per_s']} B/s",
                {},
                f"cut after {trickled['seconds_until_cut']} s, no answer",
            ),
        ]
    )


DOCS_TABLE = DocsTable(
    Path(__file__).resolve().parents[1] / "docs" / "api.md", generated_marker("hostile costs table"), costs_table
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--rounds", type=int, default=5, help="heatmap queries timed")
    parser.add_argument("--output", type=Path)
    DOCS_TABLE.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLE.write(args.write_docs)
    _, contract = open_cpu_session(args.model)
    size = (contract.input_height, contract.input_width)
    results = {
        **provenance(),
        "model": {"file": args.model.name, "sha256": sha256_of(args.model)},
        "settings": "the defaults",
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, run in (
            ("webp_bombs", webp_bombs),
            ("costly_stored_heatmaps", lambda s: costly_stored_heatmaps(s, size, args.rounds)),
            ("batch_heatmaps", batch_heatmaps),
            ("one_client_connections", one_client_connections),
            ("pipelined", pipelined),
            ("trickle", trickle),
        ):
            with ServiceProcess(args.model, Path(folder) / f"{name}.sqlite3") as server:
                results[name] = run(server)
            print(name, results[name], flush=True)
    emit(results, args.output)


if __name__ == "__main__":
    main()
