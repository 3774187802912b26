"""Where a query's heatmap time goes, piece by piece, side by side in one run (not a test).

A query with heatmaps=true re-embeds its first REID_MAX_HEATMAP_MATCHES matches' stored images for their
feature maps (the index holds embeddings only), computes each match's RAM against the query's features, and
draws the query's and each match's overlays (aggregate, per branch when asked) as base64 PNGs, unless the
query asks for grids only (overlays=false, what the web page does: it draws them). This times each piece
for one query of 10 real matches with the service's own functions, in rounds, on one thread each where the
service spreads them (so the sum is CPU time, not latency), and what a cut would save: maps from a cache
(no re-embedding), aggregate overlays only (no per-branch PNGs).

How close RAM grids from maps stored in int8 (service.stored_maps) come to those from the model's maps: each
of the 11 real crops as the query against the other 10.

Then end to end: three real servers on the shipped model, each holding the same real gallery crops: one reading
its matches' maps as stored at enrolment (the default) with no feature-map cache (REID_HEATMAP_CACHE_MB=0), so
every query reads the store; one storing none and caching none (REID_STORED_MAPS_MAX_KB=0: every heatmap
re-embeds its matches, as before stored maps); and one with the defaults whose cache already holds the
matches' maps (the same query asked before, as a user looking again or a track's next crop would). They
answer top-10 queries of real query crops in rounds, the variants alternating: no heatmaps; heatmaps with
per-branch overlays; the aggregate overlay only; grids only (the default, and what the page asks). Then
each variant's answer size, and the queries a second of ``--clients`` clients at once.

    python -m bench.heatmap_cost --data $DATA --output bench/results/heatmap_cost.json
    python -m bench.heatmap_cost --write-docs bench/results/heatmap_cost.json   # docs/results.md's table

(bench/results/heatmap_cost_cama.json is the same measurement for the CAMA default, before grids-only answers;
heatmap_cost.json for retail-0277, heatmap_cost_ensemble.json for the three-model default.)
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS_PAGE, alternating_latency, DocsTables, emit, timed
from model_zoo.provenance import provenance
from client import ReIDClient
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.contract import split_branches
from model_zoo.files import sha256_of
from model_zoo.preprocess import decode_for_model
from model_zoo.ram import ranking_activation_maps
from service.heatmaps import overlay, png_base64
from service.inference import InferenceModel
from service.stored_maps import pack, packed_bytes, unpack
from harness.server import ServiceProcess

MATCHES = 10


def cost_table(results: dict) -> str:
    """docs/results.md's table of a result file: each variant's latency and answer size, beside no heatmaps
    (the first file, heatmap_cost_cama.json, recorded neither answer sizes nor throughput: "-")."""
    figures = results["end_to_end"]
    plain = figures["latency_ms"]["no heatmaps"]["p50_ms"]
    lines = ["| query (top 10) | p50 / p95 / p99 ms | p50 x no heatmaps | answer kB |", "|---|---|---|---|"]
    for name, latency in figures["latency_ms"].items():
        lines.append(
            f"| {name} | {latency['p50_ms']} / {latency['p95_ms']} / {latency['p99_ms']} | "
            f"{latency['p50_ms'] / plain:.2f} | "
            f"{figures.get('answer_kb', {}).get(name, '-')} |"
        )
    if "queries_per_s" in figures:
        lines.append(
            f"| {figures['clients']} clients at once, queries/s | "
            + ", ".join(f"{name}: {rate}" for name, rate in figures["queries_per_s"].items())
            + " | | |"
        )
    return "\n".join(lines)


DOCS_TABLES = DocsTables.on_page(
    RESULTS_PAGE,
    cost_table,
    {
        "heatmap_cost.json": "heatmap cost table",
        "heatmap_cost_cama.json": "heatmap cost cama table",
        "heatmap_cost_ensemble.json": "default heatmap cost table",
    },
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with cuhk03-detected/query (real crops)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gallery", type=int, default=200, help="end to end: real gallery crops enrolled")
    parser.add_argument("--queries", type=int, default=10, help="end to end: real query crops per round")
    parser.add_argument(
        "--clients", type=int, default=8, help="end to end: concurrent clients for the throughput figures"
    )
    parser.add_argument("--seconds", type=float, default=15, help="end to end: length of each throughput figure")
    parser.add_argument("--output", type=Path)
    DOCS_TABLES.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLES.write(args.write_docs)
    if args.data is None:
        parser.error("--data is needed to measure")
    model = InferenceModel(args.model, "cpu", intra_op_threads=1, instances=1).load()
    files = sorted((args.data / "cuhk03-detected" / "query").glob("*.jpg"))[: MATCHES + 1]
    decoded = [decode_for_model(f.read_bytes(), *model.input_size, preview=True) for f in files]
    pixels = np.stack([d.pixels for d in decoded])
    query_embedding, _ = model.predict(pixels[:1], with_maps=False)
    query_features = split_branches(query_embedding, model.contract.num_branches)[0]
    _, maps = model.predict(pixels[1:], with_maps=True)
    rams = [ranking_activation_maps(query_features, maps.features[i]) for i in range(MATCHES)]

    def draw(grids_per_image, images):
        for grids, image in zip(grids_per_image, images):
            for grid in grids:
                png_base64(overlay(image, grid))

    previews = [d.preview for d in decoded[1:]]
    pieces = {
        "re-embed the 10 matches with maps (one model call)": lambda: model.predict(pixels[1:], with_maps=True),
        "the same call without maps (the embedding alone)": lambda: model.predict(pixels[1:], with_maps=False),
        "RAM of the 10 matches": lambda: [
            ranking_activation_maps(query_features, maps.features[i]) for i in range(MATCHES)
        ],
        "overlays, aggregate only (10 PNGs)": lambda: draw([[r.aggregate] for r in rams], previews),
        "overlays, per branch (a PNG per branch and match)": lambda: draw([list(r.per_branch) for r in rams], previews),
    }
    for step in pieces.values():  # warm-up
        step()
    rounds = {name: [] for name in pieces}
    for _ in range(args.rounds):
        for name, step in pieces.items():
            rounds[name].append(timed(step))
    medians = {name: round(statistics.median(times), 1) for name, times in rounds.items()}
    results = {
        **provenance(),
        "model": {"file": args.model.name, "sha256": sha256_of(args.model)},
        "one_thread_ms_median": medians,
        "range_ms": {name: [round(min(t), 1), round(max(t), 1)] for name, t in rounds.items()},
        "feature_map_bytes_per_item": {
            "float32": int(maps.features[0].nbytes),
            "float16": int(maps.features[0].nbytes // 2),
            "stored (int8)": packed_bytes(maps.features.shape[1:]),
        },
        "stored_maps": stored_map_error(model, pixels),
        "end_to_end": end_to_end(args),
    }
    emit(results, args.output)


def stored_map_error(model: InferenceModel, pixels: np.ndarray) -> dict:
    """Every crop as the query against every other: RAM from stored (int8) maps against RAM from the model's,
    the largest cell error as a share of that grid's range, and the largest change of the grid's mean."""
    embedding, maps = model.predict(pixels, with_maps=True)
    features = split_branches(embedding, model.contract.num_branches)
    stored = [unpack(blob) for blob in pack(maps.features)]
    errors, mean_moves = [], []
    for q in range(len(pixels)):
        for g in range(len(pixels)):
            if g != q:
                exact = ranking_activation_maps(features[q], maps.features[g]).aggregate
                approx = ranking_activation_maps(features[q], stored[g]).aggregate
                errors.append(float(np.abs(approx - exact).max() / np.ptp(exact)))
                mean_moves.append(abs(float(approx.mean() - exact.mean())))
    return {
        "pairs": len(errors),
        "cell_error_of_range": {
            "median": round(statistics.median(errors), 5),
            "max": round(max(errors), 5),
        },
        "grid_mean_change_max": float(f"{max(mean_moves):.2g}"),
    }


def end_to_end(args) -> dict:
    """Median and p95 query latency per variant, the variants alternating query by query."""
    gallery = [
        f.read_bytes()
        for f in sorted((args.data / "cuhk03-detected" / "bounding_box_test").glob("*.jpg"))[: args.gallery]
    ]
    queries = [f.read_bytes() for f in sorted((args.data / "cuhk03-detected" / "query").glob("*.jpg"))[: args.queries]]
    plan = {"intra_op_threads": 0, "model_instances": 0}  # the service's own thread plan
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServiceProcess(args.model, Path(tmp) / "stored.sqlite3", heatmap_cache_mb=0, **plan) as stored_server,
        ServiceProcess(
            args.model, Path(tmp) / "none.sqlite3", heatmap_cache_mb=0, stored_maps_max_kb=0, **plan
        ) as re_embedding_server,
        ServiceProcess(args.model, Path(tmp) / "cached.sqlite3", **plan) as cached_server,
        ReIDClient(stored_server.url, timeout=120) as stored,
        ReIDClient(re_embedding_server.url, timeout=120) as re_embedding,
        ReIDClient(cached_server.url, timeout=120) as cached,
    ):
        for reid in (stored, re_embedding, cached):
            for start in range(0, len(gallery), 16):
                reid.enroll([(f"{i}.jpg", b) for i, b in enumerate(gallery[start : start + 16])])
        for query in queries:  # the cached server has seen every query once: its matches' maps are cached
            cached.query(("q.jpg", query), heatmaps=True)
        variants = {
            "no heatmaps": lambda q: stored.query(q, heatmaps=False),
            "heatmaps, per-branch overlays, maps re-embedded": lambda q: re_embedding.query(
                q, heatmaps=True, branch_overlays=True
            ),
            "heatmaps, aggregate overlay, maps stored": lambda q: stored.query(q, heatmaps=True, overlays=True),
            "heatmaps, aggregate overlay, maps re-embedded": lambda q: re_embedding.query(
                q, heatmaps=True, overlays=True
            ),
            "heatmaps, aggregate overlay, maps cached": lambda q: cached.query(q, heatmaps=True, overlays=True),
            "heatmaps, grids only (the default), maps stored (the default)": lambda q: stored.query(
                q, heatmaps=True, overlays=False
            ),
            "heatmaps, grids only, maps re-embedded": lambda q: re_embedding.query(q, heatmaps=True, overlays=False),
            "heatmaps, grids only, maps cached": lambda q: cached.query(q, heatmaps=True, overlays=False),
        }
        asked = {name: lambda q, ask=ask: ask(("q.jpg", q)) for name, ask in variants.items()}
        latency = alternating_latency(asked, queries, args.rounds)
        answer_kb = {name: round(len(json.dumps(ask(queries[0]).raw)) / 1000, 1) for name, ask in asked.items()}
        throughput = {
            name: concurrent_rate(asked[name], queries, args.clients, args.seconds)
            for name in (
                "no heatmaps",
                "heatmaps, aggregate overlay, maps stored",
                "heatmaps, grids only (the default), maps stored (the default)",
                "heatmaps, grids only, maps re-embedded",
                "heatmaps, grids only, maps cached",
            )
        }
    return {
        "gallery_items": len(gallery),
        "queries_per_round": len(queries),
        "rounds": args.rounds,
        "top_k": 10,
        "server": "the service's own thread plan on every core, one request at a time; three servers: maps "
        "stored and no cache, neither stored maps nor cache, the defaults with the matches' maps cached",
        "latency_ms": latency,
        "answer_kb": answer_kb,
        "clients": args.clients,
        "queries_per_s": throughput,
    }


def concurrent_rate(ask, queries, clients: int, seconds: float) -> float:
    """Queries a second with ``clients`` asking at once, each as soon as its last answer came."""
    stop, done = time.monotonic() + seconds, []

    def client(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            ask(queries[i % len(queries)])
            done.append(1)
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(len(done) / seconds, 2)


if __name__ == "__main__":
    main()
