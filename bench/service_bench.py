"""Service benchmark, side by side in one run on this machine (not a test: it takes minutes).

1. Raw ONNX Runtime batch throughput of the model (batch = REID_MAX_BATCH_SIZE), in this process, in two
   thread plans: the service's own (on the CPU, one single-threaded call per core, running at once) and one
   call at a time on every core. The service's ratio is taken to the faster of the two.
2. The service's enrol throughput under concurrency: a real uvicorn server on loopback, C connections each
   posting one image per request (for each C of --clients: 4 and 32 by default), from wrk (a C load
   generator, so the client takes little of the 2 cores the server and the model share) when it is
   installed, else from C Python clients.
   (1) and (2) alternate in rounds (raw, service with each C, raw, ...) and the ratio is taken per round, next
   to each other in time, because this machine's speed drifts by 15% over minutes; the median round ratio is
   the figure reported.
3. Query latency p50/p95/p99 (client side, top_k=10) for galleries of 1k, 10k and 100k items, with and
   without heatmaps. Galleries are filled through an internal path: synthetic unit embeddings written with
   the service's own GalleryStore (a tiny placeholder image each, the model's fingerprint), plus 50 real
   enrolled images through the API so the top-k are real items with real images for the heatmaps.

    python -m bench.service_bench --output bench/results/service.json
    python -m bench.service_bench --galleries --output bench/results/service_enrol.json   # enrolment only
    python -m bench.service_bench --write-docs bench/results/service_enrol.json   # docs/results.md's table
"""

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, List, Tuple

import httpx
import numpy as np
from tqdm import tqdm

from client import AsyncReIDClient, ReIDClient
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.files import sha256_of
from service.inference import InferenceModel
from service.store import NewItem
from harness.server import ServiceProcess
from bench.common import (
    RESULTS_PAGE,
    DocsTable,
    DocsTables,
    emit,
    generated_marker,
    jpeg,
    latency_quantiles,
    synthetic_store,
)
from model_zoo.provenance import provenance


SETTLE_S = 2  # between raw and service phases: the server finishes its last batches, idle threads stop spinning


class RawModel:
    """The model alone through ONNX Runtime: ``instances`` threads each calling it on its own batch, as the
    service's model threads do (0: the service's own choice, service.inference.plan_threads)."""

    def __init__(self, model_path: Path, batch: int, instances: int = 0):
        self.model = InferenceModel(model_path, "auto", instances=instances).load()
        height, width = self.model.input_size
        self.images = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        self.model.predict(self.images, with_maps=False)

    @property
    def label(self) -> str:
        threads = self.model.intra_op_threads or "default"
        return f"{self.model.instances} concurrent call(s) x {threads} ONNX Runtime thread(s)"

    def throughput(self, seconds: float) -> float:
        done = [0] * self.model.instances
        deadline = time.perf_counter() + seconds

        def call(worker: int) -> None:
            while time.perf_counter() < deadline:
                self.model.predict(self.images, with_maps=False)
                done[worker] += len(self.images)

        started = time.perf_counter()
        threads = [threading.Thread(target=call, args=(w,)) for w in range(self.model.instances)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done) / (time.perf_counter() - started)


async def enrol_throughput(url: str, clients: int, seconds: float, images) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int):
        nonlocal done
        async with AsyncReIDClient(url) as reid:
            n = worker
            while time.perf_counter() < deadline:
                await reid.enroll([("a.jpg", images[n % len(images)])])
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
    body.write_bytes(
        b'--reidbench\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--reidbench--\r\n"
    )
    script = tmp / "enrol.lua"
    script.write_text(WRK_SCRIPT)
    result = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "30s", "-s", str(script), url + "/gallery"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "REID_BENCH_BODY": str(body)},
    )
    if "Non-2xx" in result.stdout:
        raise RuntimeError(result.stdout)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


CPU_SETTLE_S = 0.5  # ONNX Runtime's spinning threads go on for a moment after a call: counted in a query's CPU


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """CPU time of this process (the httpx clients) and its finished children (wrk)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def enrol_round(raws, enrols, server: ServiceProcess, seconds: float) -> dict:
    """Each raw configuration, then the service under load from each number of clients, with the CPU (in cores)
    the server and the client used meanwhile and the fraction of the time the service's model was running."""
    figures = {}
    for name, raw in raws.items():
        time.sleep(SETTLE_S)
        figures[name] = round(raw.throughput(seconds / 2), 1)
    best_raw = max(figures.values())
    for clients, enrol in enrols.items():
        time.sleep(SETTLE_S)
        figures[f"{clients}_clients"] = service_phase(enrol, server, seconds, best_raw)
    return figures


def service_phase(enrol, server: ServiceProcess, seconds: float, best_raw: float) -> dict:
    pid = server.process.pid
    model, cpu, client, started = (
        metric(server.url, "reid_model_seconds_sum"),
        cpu_seconds(pid),
        client_cpu_seconds(),
        time.perf_counter(),
    )
    service_rate = enrol(seconds)
    wall = time.perf_counter() - started
    return {
        "service": round(service_rate, 1),
        "ratio": round(service_rate / best_raw, 3),
        "model_busy": round((metric(server.url, "reid_model_seconds_sum") - model) / wall, 3),
        "server_cores": round((cpu_seconds(pid) - cpu) / wall, 2),
        "client_cores": round((client_cpu_seconds() - client) / wall, 2),
    }


def metric(url: str, name: str) -> float:
    """One value from the service's own Prometheus metrics."""
    return float(re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, flags=re.M).group(1))


def batching_figures(url: str) -> dict:
    """Mean images per model call and mean queue wait over the whole enrol benchmark."""
    return {
        "mean_batch_size": round(metric(url, "reid_batch_size_sum") / metric(url, "reid_batch_size_count"), 1),
        "mean_queue_wait_ms": round(
            1000 * metric(url, "reid_queue_wait_seconds_sum") / metric(url, "reid_queue_wait_seconds_count"), 1
        ),
    }


def fill_synthetic(store_path: Path, model_path: Path, count: int, dim: int) -> None:
    store = synthetic_store(store_path, sha256_of(model_path), dim)
    placeholder = jpeg(0, (8, 16))
    rng = np.random.default_rng(1)
    for start in tqdm(range(0, count, 2000), desc=f"synthetic gallery {count}", leave=False):
        vectors = rng.normal(size=(min(2000, count - start), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add([NewItem(placeholder, "JPEG", 8, 16, v, camera_id="synthetic") for v in vectors])
    store.close()


def latencies(server: ServiceProcess, images, queries: int, heatmaps: bool) -> dict:
    """Latency quantiles of ``queries`` queries one after the other, and the server's CPU time per query (what
    its threads did after each answer included: the count ends CPU_SETTLE_S after the last)."""
    times = []
    with ReIDClient(server.url, timeout=120) as reid:
        for i in range(queries + 2):
            if i == 2:  # after two warm-up queries
                cpu = cpu_seconds(server.process.pid)
            started = time.perf_counter()
            reid.query(("q.jpg", images[i % len(images)]), top_k=10, heatmaps=heatmaps)
            if i >= 2:
                times.append((time.perf_counter() - started) * 1000)
    time.sleep(CPU_SETTLE_S)
    cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / queries
    return {**latency_quantiles(times), "server_cpu_ms_per_query": round(cpu_ms, 1)}


def enrol_load(args, server: ServiceProcess, images, tmp: Path) -> Tuple[str, Callable[[int, float], float]]:
    """(what generates the load, enrol(clients, seconds) -> images per second)."""
    if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")):
        return "wrk", lambda clients, seconds: enrol_throughput_wrk(server.url, clients, seconds, images[0], tmp)
    return "httpx asyncio clients in the benchmark process", lambda clients, seconds: asyncio.run(
        enrol_throughput(server.url, clients, seconds, images)
    )


def enrol_benchmark(args, images, tmp: Path) -> dict:
    # Raw in the service's own thread plan and as one call on every thread: the ratio is to the faster.
    raws = {
        "raw_service_plan": RawModel(args.model, args.batch),
        "raw_one_call": RawModel(args.model, args.batch, instances=1),
    }
    results = {
        "raw_configurations": {name: raw.label for name, raw in raws.items()},
        "server_settings": args.server_settings,
    }
    # 0 = the service's own thread plan, as in raw_service_plan (the test helper otherwise pins one thread)
    with ServiceProcess(
        args.model,
        tmp / "enrol.sqlite3",
        max_batch_size=args.batch,
        max_batch_wait_ms=10,
        intra_op_threads=0,
        model_instances=0,
        **args.server_settings,
    ) as server:
        results["enrol_client"], enrol = enrol_load(args, server, images, tmp)
        enrol(max(args.clients), 3)  # warm-up: connections, first batches
        enrols = {clients: partial(enrol, clients) for clients in args.clients}
        rounds = [
            enrol_round(raws, enrols, server, args.seconds)
            for _ in tqdm(range(args.rounds), desc="raw / service rounds")
        ]
        results["service_batching"] = batching_figures(server.url)
    results["enrol_rounds"] = rounds
    for name in raws:
        results[f"{name}_images_per_s"] = statistics.median(r[name] for r in rounds)
    results["service"] = {clients: enrol_summary([r[f"{clients}_clients"] for r in rounds]) for clients in args.clients}
    return results


def enrol_summary(phases: List[dict]) -> dict:
    """Medians over the rounds of one number of clients, and the range of the per-round ratio to raw."""
    ratios = [phase["ratio"] for phase in phases]
    return {
        "enrol_images_per_s": statistics.median(phase["service"] for phase in phases),
        "over_raw": round(statistics.median(ratios), 3),
        "over_raw_range": [min(ratios), max(ratios)],
        "model_busy": statistics.median(phase["model_busy"] for phase in phases),
        "server_cores": statistics.median(phase["server_cores"] for phase in phases),
    }


def query_benchmark(args, images, tmp: Path) -> dict:
    dim = InferenceModel(args.model, "cpu").load().contract.embedding_dim
    results = {}
    for size in args.galleries:
        store = tmp / f"gallery{size}.sqlite3"
        fill_synthetic(store, args.model, size - 50, dim)
        with ServiceProcess(
            args.model, store, max_batch_size=args.batch, max_top_k=100, intra_op_threads=0, model_instances=0
        ) as server:
            with ReIDClient(server.url, timeout=120) as reid:
                for i in range(0, 50, 10):
                    reid.enroll([(f"{j}.jpg", images[j]) for j in range(i, i + 10)])
            results[str(size)] = {f"heatmaps_{h}": latencies(server, images, args.queries, h) for h in (False, True)}
        print(size, json.dumps(results[str(size)]), flush=True)
        store.unlink()
    return results


def enrol_table(results: dict) -> str:
    """A docs table of a result file's enrolment: per number of clients, the service beside the raw model."""
    raw = max(results[f"{name}_images_per_s"] for name in results["raw_configurations"])
    lines = [
        "| clients (one image per request) | service images/s | of the raw model's (rounds) | model busy (of "
        "2 calls) | server cores |",
        "|---|---|---|---|---|",
    ]
    for clients, figures in results["service"].items():
        low, high = figures["over_raw_range"]
        lines.append(
            f"| {clients} | {figures['enrol_images_per_s']:.1f} | **{100 * figures['over_raw']:.1f}%** "
            f"({100 * low:.1f}-{100 * high:.1f}%) | {figures['model_busy']:.2f} | {figures['server_cores']:.2f} |"
        )
    lines.append(f"| raw model, batch 32, the faster thread plan (median of the rounds) | {raw:.1f} | | | |")
    return "\n".join(lines)


def query_table(results: dict) -> str:
    """A docs table of a result file's query latencies, per gallery size, without and with heatmaps (and the
    server's CPU per query, in files that record it)."""
    lines = [
        "| gallery items | query p50 / p95 / p99 ms, no heatmaps | with heatmaps | queries each |",
        "|---|---|---|---|",
    ]
    for size, figures in results["query_latency"].items():
        cells = [query_cell(figures[f"heatmaps_{h}"]) for h in (False, True)]
        lines.append(f"| {int(size):,} | {cells[0]} | {cells[1]} | {figures['heatmaps_False']['queries']} |")
    return "\n".join(lines)


def query_cell(figures: dict) -> str:
    cell = " / ".join(str(figures[f"{q}_ms"]) for q in ("p50", "p95", "p99"))
    cpu = figures.get("server_cpu_ms_per_query")
    return cell if cpu is None else f"{cell} (server CPU {cpu} ms a query)"


DOCS_TABLES = DocsTables(
    {
        "service_query.json": DocsTable(RESULTS_PAGE, generated_marker("lone query table"), query_table),
        "service_query_before.json": DocsTable(RESULTS_PAGE, generated_marker("lone query before table"), query_table),
        "service_query_sleeping.json": DocsTable(
            RESULTS_PAGE, generated_marker("lone query sleeping table"), query_table
        ),
        "service.json": DocsTable(RESULTS_PAGE, generated_marker("previous default query table"), query_table),
        "service_query_ensemble.json": DocsTable(RESULTS_PAGE, generated_marker("default query table"), query_table),
        "service_enrol_ensemble.json": DocsTable(
            RESULTS_PAGE, generated_marker("default enrolment table"), enrol_table
        ),
        "service_enrol.json": DocsTable(RESULTS_PAGE, generated_marker("enrolment table"), enrol_table),
        "service_enrol_before.json": DocsTable(RESULTS_PAGE, generated_marker("enrolment before table"), enrol_table),
        "service_enrol_no_stored_maps.json": DocsTable(
            RESULTS_PAGE, generated_marker("enrolment without stored maps table"), enrol_table
        ),
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="ONNX model (default: the shipped one)")
    parser.add_argument("--batch", type=int, default=32, help="max batch size, raw and in the service")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[4, 32], help="concurrent enrolling clients, each count measured"
    )
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "httpx"],
        default="auto",
        help="enrol load generator (auto: wrk when installed)",
    )
    parser.add_argument(
        "--seconds", type=float, default=20, help="length of each service measurement (raw: half of it)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="raw / service measurement rounds (0: query latency only)"
    )
    parser.add_argument(
        "--galleries", type=int, nargs="*", default=[1000, 10000, 100000], help="gallery sizes for query latency"
    )
    parser.add_argument("--queries", type=int, default=50, help="queries per latency figure")
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a service setting for the enrolment server (its REID_ name in lower case, without REID_), e.g. "
        "stored_maps_max_kb=0; repeatable",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    DOCS_TABLES.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLES.write(args.write_docs)
    args.server_settings = dict(setting.split("=", 1) for setting in args.server_setting)

    images = [jpeg(i) for i in range(64)]
    results = {**provenance(), "model": {"file": args.model.name, "sha256": sha256_of(args.model)}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.rounds:  # 0: query latency only
            results.update(enrol_benchmark(args, images, Path(tmp)))
            print(json.dumps(results, indent=2), flush=True)
        results["query_latency"] = query_benchmark(args, images, Path(tmp))
    emit(results, args.output)


if __name__ == "__main__":
    main()
