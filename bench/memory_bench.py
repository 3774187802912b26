"""What one hostile request costs the server (issue 12, item 4): a real uvicorn server with the shipped model.

1. Peak memory: one POST /gallery of 16 highly compressed 6300x6300 PNGs (about 38 kB each, under the
   per-image pixel limit), read as the server process's VmHWM (peak resident set) before and after.
2. Heatmap work: a query with top_k=100 and heatmaps on, against 110 enrolled images: seconds and bytes.

    python -m bench.memory_bench --output bench/results/memory.json
    python -m bench.memory_bench --max-request-pixels 700000000 --output bench/results/memory_all_decoded.json

The first run keeps the default REID_MAX_REQUEST_PIXELS (the request is refused once over it); the second
raises it so that all 16 images are decoded, as before the limit existed.
"""

import argparse
import io
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.provenance import provenance
from bench.common import emit, memory_kb
from harness.server import ServiceProcess

SIDE = 6300  # 39.7 MP: under the default REID_MAX_IMAGE_PIXELS (40 MP)


def compressed_png(seed: int) -> bytes:
    """A 6300x6300 RGB PNG of a few flat blocks: a few tens of kB that decode to 159 MB in PIL."""
    blocks = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks).resize((SIDE, SIDE), Image.NEAREST).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def crop_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((128, 256), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def peak_memory(server: ServiceProcess, client: httpx.Client) -> dict:
    pngs = [compressed_png(i) for i in range(16)]
    pid = server.process.pid
    before = memory_kb(pid, "VmHWM")
    started = time.perf_counter()
    response = client.post("/gallery", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
    return {
        "request_bytes": sum(map(len, pngs)),
        "status": response.status_code,
        "answer": response.json() if response.status_code != 201 else "created",
        "seconds": round(time.perf_counter() - started, 2),
        "vmhwm_before_mb": round(before / 1024, 1),
        "vmhwm_after_mb": round(memory_kb(pid, "VmHWM") / 1024, 1),
    }


def heatmap_query(client: httpx.Client) -> dict:
    for start in range(0, 110, 10):
        enrolled = client.post(
            "/gallery", files=[("images", (f"{i}.jpg", crop_jpeg(i), "image/jpeg")) for i in range(start, start + 10)]
        )
        assert enrolled.status_code == 201, enrolled.text
    client.post("/query", files={"image": ("q.jpg", crop_jpeg(0), "image/jpeg")}, data={"top_k": 10})  # warm-up
    started = time.perf_counter()
    response = client.post("/query", files={"image": ("q.jpg", crop_jpeg(0), "image/jpeg")}, data={"top_k": 100})
    body = response.json()
    return {
        "status": response.status_code,
        "seconds": round(time.perf_counter() - started, 2),
        "response_mb": round(len(response.content) / 1e6, 2),
        "matches": len(body["matches"]),
        "matches_with_heatmaps": sum(m["heatmap"] is not None for m in body["matches"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-request-pixels", type=int, help="REID_MAX_REQUEST_PIXELS for the server (default: the service's)"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    settings = {"max_request_pixels": args.max_request_pixels} if args.max_request_pixels else {}
    with tempfile.TemporaryDirectory() as folder:
        with (
            ServiceProcess(DEFAULT_MODEL_PATH, Path(folder) / "g.sqlite3", intra_op_threads=0, **settings) as server,
            server.client() as client,
        ):
            figures = {
                **provenance(),
                "model": DEFAULT_MODEL_PATH.name,
                "settings": settings,
                "peak_memory": peak_memory(server, client),
                "heatmap_query": heatmap_query(client),
            }
    emit(figures, args.output)


if __name__ == "__main__":
    main()
