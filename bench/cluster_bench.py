"""Enrolment and query throughput and latency of the embedded gallery (SQLite + FAISS, one server) against the
cluster backend (PostgreSQL + Milvus through milvus-lite's server) with 1 and 2 replicas, all on this machine
and in one run, on real pedestrian crops and the shipped model.

Each setting gets a fresh gallery. Enrolment: CLIENTS concurrent clients each post requests of BATCH images
until ENROL images are in. Queries: CLIENTS concurrent clients, QUERIES queries of one image, top_k 10, no
heatmaps. With replicas, the clients take turns over them as a round-robin load balancer would.

    python -m bench.cluster_bench --data $DATA --enrol 600 --queries 160 --output bench/results/cluster.json
    python -m bench.cluster_bench --write-docs bench/results/cluster.json   # docs/deployment.md's table
"""

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import httpx

from bench.common import DocsTable, emit, generated_marker, latency_quantiles
from harness.cluster import ClusterServers, unavailable
from harness.server import ServiceProcess
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.files import sha256_of
from model_zoo.provenance import data_fingerprint, provenance

REPO = Path(__file__).resolve().parents[1]


def crops(data: Path, count: int, seed: int = 0) -> List[bytes]:
    paths = sorted((data / "cuhk03-detected").glob("*/*.jpg"))
    return [p.read_bytes() for p in random.Random(seed).sample(paths, count)]


async def enrol_all(urls: List[str], images: List[bytes], clients: int, batch: int) -> dict:
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    times: List[float] = []

    async def client(worker: int):
        async with httpx.AsyncClient(timeout=120) as http:
            for n in range(worker, len(batches), clients):
                files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(batches[n])]
                started = time.perf_counter()
                response = await http.post(urls[n % len(urls)] + "/gallery", files=files, data={"person_id": str(n)})
                response.raise_for_status()
                times.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(clients)))
    seconds = time.perf_counter() - started
    return {
        "images_per_s": round(len(images) / seconds, 1),
        "requests": len(batches),
        "request_ms": latency_quantiles(times),
    }


async def query_all(urls: List[str], images: List[bytes], clients: int) -> dict:
    """Throughput and latency, and the median of the steps each answer times (timing_ms: embed, search)."""
    times: List[float] = []
    steps: Dict[str, List[float]] = {"embed": [], "search": []}

    async def client(worker: int):
        async with httpx.AsyncClient(timeout=120) as http:
            for n in range(worker, len(images), clients):
                started = time.perf_counter()
                response = await http.post(
                    urls[n % len(urls)] + "/query",
                    files={"image": ("q.jpg", images[n], "image/jpeg")},
                    data={"top_k": "10", "heatmaps": "false"},
                )
                response.raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
                for step, values in steps.items():
                    values.append(response.json()["timing_ms"][step])

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(clients)))
    seconds = time.perf_counter() - started
    return {
        "queries_per_s": round(len(images) / seconds, 1),
        **latency_quantiles(times),
        **{f"{step}_p50_ms": round(statistics.median(values), 1) for step, values in steps.items()},
    }


def run_setting(name: str, servers: List[ServiceProcess], gallery: List[bytes], queries: List[bytes], args) -> dict:
    for server in servers:
        server.start(timeout=180)
    try:
        urls = [server.url for server in servers]
        enrol = asyncio.run(enrol_all(urls, gallery, args.clients, args.batch))
        query = asyncio.run(query_all(urls, queries, args.clients))
        size = httpx.get(urls[-1] + "/readyz", timeout=30).json()["gallery_size"]
    finally:
        for server in servers:
            server.stop()
    print(
        f"{name}: enrol {enrol['images_per_s']} images/s, query {query['queries_per_s']}/s p99 {query['p99_ms']} ms",
        file=sys.stderr,
    )
    return {"setting": name, "replicas": len(servers), "gallery_size": size, "enrol": enrol, "query": query}


def table(results: dict) -> str:
    """One row per setting: enrolment and query throughput (against the embedded gallery's) and latency."""
    lines = [
        "| setting | enrol images/s (vs embedded) | enrol request p50 / p99 ms | queries/s (vs embedded) "
        "| query p50 / p99 ms | of which embed / search p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        enrol, query = run["enrol"], run["query"]
        lines.append(
            f"| {run['setting']} | {enrol['images_per_s']} ({run['enrol_vs_embedded']}x) "
            f"| {enrol['request_ms']['p50_ms']} / {enrol['request_ms']['p99_ms']} "
            f"| {query['queries_per_s']} ({run['query_vs_embedded']}x) | {query['p50_ms']} / {query['p99_ms']} "
            f"| {query['embed_p50_ms']} / {query['search_p50_ms']} |"
        )
    return "\n".join(lines)


DOCS_TABLE = DocsTable(REPO / "docs" / "deployment.md", generated_marker("cluster table"), table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="the data folder (cuhk03-detected's crops are the images)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--enrol", type=int, default=1200, help="images enrolled per setting")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8, help="images per enrolment request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/reid-cluster-bench"))
    parser.add_argument("--output", type=Path)
    DOCS_TABLE.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        DOCS_TABLE.write(args.write_docs)
        return
    if args.data is None:
        parser.error("--data is required to measure")
    reason = unavailable()
    if reason:
        sys.exit(f"the cluster backend cannot run here: {reason}")
    images = crops(args.data, args.enrol + args.queries)
    gallery, queries = images[: args.enrol], images[args.enrol :]
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.work))  # a fresh embedded gallery, as the cluster's
    settings = {"intra_op_threads": 0, "log_level": "warning"}
    cluster = ClusterServers().start()
    try:
        runs = [
            run_setting(
                "embedded (SQLite + FAISS)",
                [ServiceProcess(args.model, work / "embedded.sqlite3", **settings)],
                gallery,
                queries,
                args,
            )
        ]
        for replicas in (1, 2):
            backend = cluster.new_gallery()
            servers = [
                ServiceProcess(args.model, work / f"unused{i}.sqlite3", **settings, **backend) for i in range(replicas)
            ]
            runs.append(
                run_setting(
                    f"cluster, {replicas} replica(s) (PostgreSQL + milvus-lite)", servers, gallery, queries, args
                )
            )
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    for run in runs:
        run["enrol_vs_embedded"] = round(run["enrol"]["images_per_s"] / base["enrol"]["images_per_s"], 2)
        run["query_vs_embedded"] = round(run["query"]["queries_per_s"] / base["query"]["queries_per_s"], 2)
    emit(
        {
            **provenance(),
            "model": args.model.name,
            "model_sha256": sha256_of(args.model),
            "data": {"cuhk03-detected": data_fingerprint(args.data / "cuhk03-detected")},
            "enrolled": args.enrol,
            "queries": args.queries,
            "batch": args.batch,
            "clients": args.clients,
            "runs": runs,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
