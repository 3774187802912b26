"""What CASN's pairwise re-ranking costs a query, per model, side by side in one run (not a test).

A query with pair_attention=true re-embeds its whole shortlist (REID_RERANK_SHORTLIST hits, 100 by default)
for their maps A and runs the pair head on every (query, hit) pair; a plain query reads the index alone.
For each model given (a CASN export with its ``MODEL.pair_head.npz`` beside it: the IDE layout and the
stripe layout), a real server on that model holds the same real gallery crops and answers top-10 queries of
real query crops, the variants alternating query by query: plain, k-reciprocal re-ranking over the same
shortlist (the other re-ranking stage, for scale), the pair stage; each without heatmaps and with them
(aggregate overlays). Latency and answer size per variant, on two servers: one without the feature-map cache
(REID_HEATMAP_CACHE_MB=0: every shortlist is re-embedded, as for a gallery larger than the cache) and one with
the default cache after the same queries were asked once (every hit's maps cached: the best case).

    python -m bench.pair_attention_cost --data $DATA --model RUN_A/casn_ide.onnx --model RUN_B/casn_pcb.onnx \
        --output bench/results/pair_attention_cost.json
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import alternating_latency, emit
from harness.server import ServiceProcess, enrol, query
from model_zoo.provenance import provenance

VARIANTS = {
    "plain": {},
    "k-reciprocal re-ranking": {"rerank": True},
    "pair_attention": {"pair_attention": True},
}
SHORTLIST = 100  # the service's default REID_RERANK_SHORTLIST, set explicitly so the figures say what they measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with cuhk03-detected/{bounding_box_test,query}"
    )
    parser.add_argument(
        "--model", type=Path, action="append", required=True, help="a CASN ONNX file with its pair head beside it"
    )
    parser.add_argument("--gallery", type=int, default=200, help="real gallery crops enrolled")
    parser.add_argument("--queries", type=int, default=5, help="real query crops per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    root = args.data / "cuhk03-detected"
    gallery = [f.read_bytes() for f in sorted((root / "bounding_box_test").glob("*.jpg"))[: args.gallery]]
    queries = [f.read_bytes() for f in sorted((root / "query").glob("*.jpg"))[: args.queries]]
    results = {
        **provenance(),
        "gallery_items": len(gallery),
        "queries_per_round": len(queries),
        "rounds": args.rounds,
        "top_k": 10,
        "shortlist": SHORTLIST,
        "server": "the service's own thread plan on every core, one request at a time",
        "models": {model.name: one_model(model, gallery, queries, args.rounds) for model in args.model},
    }
    emit(results, args.output)


def one_model(model: Path, gallery, queries, rounds: int) -> dict:
    """The variants on a server without the feature-map cache and on one with it."""
    return {
        cache: one_server(model, gallery, queries, rounds, cache_mb)
        for cache, cache_mb in (("no map cache", 0), ("maps cached", None))
    }


def one_server(model: Path, gallery, queries, rounds: int, cache_mb) -> dict:
    """Latency and answer size per variant on one server, the variants alternating query by query."""
    plan = {
        "intra_op_threads": 0,
        "model_instances": 0,
        "rerank_shortlist": SHORTLIST,
        **({} if cache_mb is None else {"heatmap_cache_mb": cache_mb}),
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServiceProcess(model, Path(tmp) / "gallery.sqlite3", **plan) as server,
        server.client() as http,
    ):
        http.timeout = 300
        assert http.get("/model").json()["pair_head"], f"{model} has no pair head beside it"
        for start in range(0, len(gallery), 16):
            enrol(http, gallery[start : start + 16])
        asks = {
            f"{name}, {'heatmaps' if heatmaps else 'no heatmaps'}": {
                **fields,
                "top_k": 10,
                "heatmaps": heatmaps,
                "branch_overlays": False,
            }
            for name, fields in VARIANTS.items()
            for heatmaps in (False, True)
        }
        sizes = {name: [] for name in asks}

        def ask(name: str, blob: bytes) -> None:
            answer = query(http, blob, **asks[name])
            answer.raise_for_status()
            sizes[name].append(len(answer.content))

        for blob in queries:  # warm-up: every path once (and, on the cached server, every hit's maps)
            for name in asks:
                ask(name, blob)
        for name in asks:
            sizes[name].clear()
        latency = alternating_latency({name: lambda blob, name=name: ask(name, blob) for name in asks}, queries, rounds)
    return {
        "latency_ms": latency,
        "answer_kb_median": {name: round(statistics.median(s) / 1024, 1) for name, s in sizes.items()},
    }


if __name__ == "__main__":
    main()
