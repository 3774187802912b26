"""Service benchmark, side by side in one run on this machine (not a test: it takes minutes).

1. Raw ONNX Runtime batch throughput of the model (batch = REID_MAX_BATCH_SIZE).
2. The service's enrol throughput under concurrency: a real uvicorn server on loopback, C connections each
   posting one image per request, from wrk (a C load generator, so the client takes little of the 2 cores
   the server and the model share) when it is installed, else from C Python clients; reported with its ratio
   to (1).
3. Query latency p50/p95/p99 (client side, top_k=10) for galleries of 1k, 10k and 100k items, with and
   without heatmaps. Galleries are filled through an internal path: synthetic unit embeddings written with
   the service's own GalleryStore (a tiny placeholder image each, the model's fingerprint), plus 50 real
   enrolled images through the API so the top-k are real items with real images for the heatmaps.

    python bench/service_bench.py --output bench/results/service.json
"""
import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_zoo import DEFAULT_MODEL_PATH  # noqa: E402
from service.gallery import EMBEDDING_DIM_KEY, FINGERPRINT_KEY  # noqa: E402
from model_zoo.files import sha256_of  # noqa: E402
from service.inference import InferenceModel  # noqa: E402
from service.store import GalleryStore, NewItem  # noqa: E402
from tests.server import ServiceProcess  # noqa: E402


def jpeg(seed: int, size=(64, 160)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8), size[1] // 8, 0), size[0] // 4, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def raw_throughput(model_path: Path, batch: int, seconds: float) -> float:
    model = InferenceModel(model_path, "auto").load()
    height, width = model.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    model.predict(images, with_maps=False)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(images, with_maps=False)
        done += batch
    return done / (time.perf_counter() - started)


async def enrol_throughput(url: str, clients: int, seconds: float, images) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int):
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            n = worker
            while time.perf_counter() < deadline:
                r = await c.post("/gallery", files=[("images", ("a.jpg", images[n % len(images)], "image/jpeg"))])
                r.raise_for_status()
                done += 1
                n += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(clients)))
    return done / (time.perf_counter() - started)


WRK_SCRIPT = """
local f = io.open(os.getenv("REID_BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=reidbench"
"""


def enrol_throughput_wrk(url: str, clients: int, seconds: float, image: bytes, tmp: Path) -> float:
    """Requests (= images) per second from wrk; any non-2xx answer fails the benchmark."""
    body = tmp / "body.bin"
    body.write_bytes(b'--reidbench\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
                     b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--reidbench--\r\n")
    script = tmp / "enrol.lua"
    script.write_text(WRK_SCRIPT)
    result = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "30s", "-s", str(script), url + "/gallery"],
                            capture_output=True, text=True, check=True, env={**os.environ, "REID_BENCH_BODY": str(body)})
    if "Non-2xx" in result.stdout:
        raise RuntimeError(result.stdout)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


def batching_figures(metrics: str) -> dict:
    """Mean images per model call and mean queue wait, from the service's own Prometheus metrics."""
    def value(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", metrics, flags=re.M).group(1))

    return {"mean_batch_size": round(value("reid_batch_size_sum") / value("reid_batch_size_count"), 1),
            "mean_queue_wait_ms": round(1000 * value("reid_queue_wait_seconds_sum") / value("reid_queue_wait_seconds_count"), 1)}


def fill_synthetic(store_path: Path, model_path: Path, count: int, dim: int) -> None:
    store = GalleryStore(store_path)
    store.set_meta({FINGERPRINT_KEY: sha256_of(model_path), EMBEDDING_DIM_KEY: str(dim)})
    placeholder = jpeg(0, (8, 16))
    rng = np.random.default_rng(1)
    for start in tqdm(range(0, count, 2000), desc=f"synthetic gallery {count}", leave=False):
        vectors = rng.normal(size=(min(2000, count - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add([NewItem(placeholder, "JPEG", 8, 16, v, camera_id="synthetic") for v in vectors])
    store.close()


def latencies(url: str, images, queries: int, heatmaps: bool) -> dict:
    times = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(queries + 2):
            started = time.perf_counter()
            r = c.post("/query", files=[("image", ("q.jpg", images[i % len(images)], "image/jpeg"))],
                       data={"top_k": "10", "heatmaps": str(heatmaps).lower()})
            r.raise_for_status()
            if i >= 2:  # two warm-up queries
                times.append((time.perf_counter() - started) * 1000)
    q = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1), "p99_ms": round(q[98], 1), "queries": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="ONNX model (default: the shipped one)")
    parser.add_argument("--batch", type=int, default=32, help="max batch size, raw and in the service")
    parser.add_argument("--clients", type=int, default=32, help="concurrent enrolling clients")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto", help="enrol load generator (auto: wrk when installed)")
    parser.add_argument("--seconds", type=float, default=30, help="length of each throughput measurement")
    parser.add_argument("--galleries", type=int, nargs="*", default=[1000, 10000, 100000], help="gallery sizes for query latency")
    parser.add_argument("--queries", type=int, default=50, help="queries per latency figure")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    images = [jpeg(i) for i in range(64)]
    results = {"model": args.model.name, "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
               "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["raw_onnxruntime_images_per_s"] = round(raw_throughput(args.model, args.batch, args.seconds), 1)
        # intra_op_threads=0: ONNX Runtime's default, as in the raw figure (the test helper otherwise pins 1)
        with ServiceProcess(args.model, tmp / "enrol.sqlite3", max_batch_size=args.batch, max_batch_wait_ms=10, intra_op_threads=0) as server:
            if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")):
                service = enrol_throughput_wrk(server.url, args.clients, args.seconds, images[0], tmp)
                results["enrol_client"] = f"wrk, {args.clients} connections"
            else:
                service = asyncio.run(enrol_throughput(server.url, args.clients, args.seconds, images))
                results["enrol_client"] = f"httpx, {args.clients} asyncio clients in the benchmark process"
            results["service_batching"] = batching_figures(httpx.get(server.url + "/metrics").text)
        results["service_enrol_images_per_s"] = round(service, 1)
        results["service_over_raw"] = round(service / results["raw_onnxruntime_images_per_s"], 3)
        print(json.dumps(results, indent=2), flush=True)

        dim = InferenceModel(args.model, "cpu").load().contract.embedding_dim
        results["query_latency"] = {}
        for size in args.galleries:
            store = tmp / f"gallery{size}.sqlite3"
            fill_synthetic(store, args.model, size - 50, dim)
            with ServiceProcess(args.model, store, max_batch_size=args.batch, max_top_k=100, intra_op_threads=0) as server:
                with httpx.Client(base_url=server.url, timeout=120) as c:
                    for i in range(0, 50, 10):
                        c.post("/gallery", files=[("images", (f"{j}.jpg", images[j], "image/jpeg")) for j in range(i, i + 10)]).raise_for_status()
                figures = {f"heatmaps_{h}": latencies(server.url, images, args.queries, h) for h in (False, True)}
            results["query_latency"][str(size)] = figures
            print(size, json.dumps(figures), flush=True)
            store.unlink()
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
