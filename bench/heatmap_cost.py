"""Where a query's heatmap time goes, piece by piece, side by side in one run (not a test).

A query with heatmaps=true re-embeds its first REID_MAX_HEATMAP_MATCHES matches' stored images for their
feature maps (the index holds embeddings only), computes each match's RAM against the query's features, and
draws the query's and each match's overlays (aggregate and per branch) as base64 PNGs. This times each piece
for one query of 10 real matches with the service's own functions, in rounds, on one thread each where the
service spreads them (so the sum is CPU time, not latency), and what a cut would save: maps from a cache
(no re-embedding), aggregate overlays only (no per-branch PNGs).

    python bench/heatmap_cost.py --data ../shared/data --output bench/results/heatmap_cost.json
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit  # noqa: E402
from model_zoo import DEFAULT_MODEL_PATH  # noqa: E402
from model_zoo.contract import split_branches  # noqa: E402
from model_zoo.preprocess import decode_for_model  # noqa: E402
from model_zoo.ram import ranking_activation_maps  # noqa: E402
from service.heatmaps import overlay, png_base64  # noqa: E402
from service.inference import InferenceModel  # noqa: E402

MATCHES = 10


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with cuhk03-detected/query (real crops)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
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
        "RAM of the 10 matches": lambda: [ranking_activation_maps(query_features, maps.features[i]) for i in range(MATCHES)],
        "overlays, aggregate only (10 PNGs)": lambda: draw([[r.aggregate] for r in rams], previews),
        "overlays, per branch (30 PNGs)": lambda: draw([list(r.per_branch) for r in rams], previews),
    }
    for step in pieces.values():  # warm-up
        step()
    rounds = {name: [] for name in pieces}
    for _ in range(args.rounds):
        for name, step in pieces.items():
            rounds[name].append(timed(step))
    medians = {name: round(statistics.median(times), 1) for name, times in rounds.items()}
    results = {"model": args.model.name, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "command": " ".join(sys.argv), "one_thread_ms_median": medians,
               "range_ms": {name: [round(min(t), 1), round(max(t), 1)] for name, t in rounds.items()},
               "feature_map_bytes_per_item": {"float32": int(maps.features[0].nbytes), "float16": int(maps.features[0].nbytes // 2)}}
    emit(results, args.output)


if __name__ == "__main__":
    main()
