"""Searches off the event loop: query throughput and the latency of everything else, against a baseline
commit, side by side in one run (not a test).

Two code trees (this one, and ``--baseline``: a checkout of an older commit, made with ``git worktree add``)
each build their own store of ``--items`` synthetic embeddings (the shipped model's fingerprint, a flat index:
the default) and serve it in turn, rounds alternating, so both meet the same machine state. In each round
``--clients`` clients post queries (top_k=10, no heatmaps) as fast as they are answered while one more client
asks GET /healthz every 50 ms: the queries' rate and latency, and /healthz's latency, which measures how long
a request waits behind searches on the event loop.

    git worktree add $RUNS/baseline 49c62f2
    python -m bench.loop_free --baseline $RUNS/baseline --output bench/results/loop_free.json
    python -m bench.loop_free --write-docs bench/results/loop_free.json   # docs/results.md's table, from the file
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import httpx

from bench.common import RESULTS_PAGE, DocsTable, emit, generated_marker, jpeg, latency_quantiles
from model_zoo.provenance import described_commit, provenance
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.contract import open_cpu_session
from model_zoo.files import sha256_of
from harness.server import free_port

REPO = Path(__file__).resolve().parents[1]
FILL = (
    "import sys; from pathlib import Path; from bench.service_bench import fill_synthetic; "
    "fill_synthetic(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))"
)


def serve(tree: Path, model: Path, store: Path) -> subprocess.Popen:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "REID_MODEL_PATH": str(model),
        "REID_STORE_PATH": str(store),
        "REID_PORT": str(port),
        "REID_HOST": "127.0.0.1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    process.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(process.url + "/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"the server of {tree} was not ready")


def load(url: str, clients: int, seconds: float) -> Dict[str, object]:
    """``clients`` querying as fast as answered and one client polling /healthz, for ``seconds``."""
    query, stop = jpeg(7), time.monotonic() + seconds
    query_ms: List[float] = []
    health_ms: List[float] = []

    def querying():
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                started = time.perf_counter()
                assert (
                    c.post(
                        "/query",
                        files={"image": ("q.jpg", query, "image/jpeg")},
                        data={"top_k": "10", "heatmaps": "false"},
                    ).status_code
                    == 200
                )
                query_ms.append(1000 * (time.perf_counter() - started))

    def polling():
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                started = time.perf_counter()
                c.get("/healthz")
                health_ms.append(1000 * (time.perf_counter() - started))
                time.sleep(0.05)

    threads = [threading.Thread(target=querying) for _ in range(clients)] + [threading.Thread(target=polling)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "queries_per_s": round(len(query_ms) / seconds, 2),
        "query": latency_quantiles(query_ms),
        "healthz": latency_quantiles(health_ms),
    }


def loop_table(results: dict) -> str:
    """docs/results.md's table of a result file: per round and tree, the query rate and both latencies."""
    lines = ["| round | code | queries/s | query p50 / p99 ms | GET /healthz p50 / p99 ms |", "|---|---|---|---|---|"]
    for number, figures in enumerate(results["rounds"], 1):
        for name, row in figures.items():
            lines.append(
                f"| {number} | {name} ({results['trees'][name]}) | {row['queries_per_s']} | "
                f"{row['query']['p50_ms']} / "
                f"{row['query']['p99_ms']} | {row['healthz']['p50_ms']} / {row['healthz']['p99_ms']} |"
            )
    return "\n".join(lines)


DOCS_TABLE = DocsTable(RESULTS_PAGE, generated_marker("loop free table"), loop_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path)
    DOCS_TABLE.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLE.write(args.write_docs)
    if args.baseline is None:
        parser.error("--baseline is needed to measure")
    model = args.model.resolve()
    _, contract = open_cpu_session(model)
    trees = {"this": REPO, "baseline": args.baseline.resolve()}
    results = {
        **provenance(),
        "model": {"file": model.name, "sha256": sha256_of(model)},
        "items": args.items,
        "clients": args.clients,
        "seconds": args.seconds,
        "trees": {name: described_commit(tree) for name, tree in trees.items()},
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        stores = {name: Path(folder) / f"{name}.sqlite3" for name in trees}
        for name, tree in trees.items():
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    FILL,
                    str(stores[name]),
                    str(model),
                    str(args.items),
                    str(contract.embedding_dim),
                ],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
                check=True,
            )
        for round_number in range(args.rounds):
            figures = {}
            for name, tree in trees.items():
                server = serve(tree, model, stores[name])
                try:
                    figures[name] = load(server.url, args.clients, args.seconds)
                finally:
                    server.terminate()
                    server.wait(30)
                print(round_number, name, figures[name], flush=True)
            results["rounds"].append(figures)
    rounds = results["rounds"]
    results["median"] = {
        "queries_per_s_ratio": statistics.median(
            r["this"]["queries_per_s"] / r["baseline"]["queries_per_s"] for r in rounds
        ),
        **{
            f"{kind}_{q}": {name: statistics.median(r[name][kind][q] for r in rounds) for name in trees}
            for kind in ("healthz", "query")
            for q in ("p50_ms", "p99_ms")
        },
    }
    emit(results, args.output)


if __name__ == "__main__":
    main()
