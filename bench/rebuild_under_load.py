"""Queries and writes while the index is rebuilt in the background, on a gallery of a million (not a test).

The service's own Gallery on the store bench/gallery_scale.py fills (the same index settings as the served
million-item figures): the index is built at open, then queries (real query images' embeddings, cached by
gallery_scale.py) run on the event loop one after another, first for a while with nothing else going on, then
while a rebuild runs in its worker thread. The rebuild is set off the way the service sets one off: a write
(one enrolment) after which the index asks for a rebuild; here it asks because its record of how many vectors
it was trained on is set to 1, as if the gallery had grown 4x since. During the rebuild one more enrolment is
timed, and the two enrolled items are deleted at the end, leaving the store as it was.

    python -m bench.rebuild_under_load --work $RUNS/scale --size 1000000 --output bench/results/rebuild_under_load.json
"""

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from bench.common import emit, jpeg, latency_quantiles
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.provenance import provenance
from service.gallery import Gallery
from service.inference import InferenceModel
from service.settings import Settings
from service.store import GalleryStore, NewItem


async def timed_searches(gallery: Gallery, queries: np.ndarray, until) -> list:
    """Search latencies (ms), one query after another, each yielding to the loop, until ``until()``."""
    times, i = [], 0
    while not until():
        started = time.perf_counter()
        gallery.search(queries[i % len(queries)], 10)
        times.append((time.perf_counter() - started) * 1000)
        i += 1
        await asyncio.sleep(0)
    return times


async def scenario(gallery: Gallery, queries: np.ndarray, quiet_s: float) -> dict:
    await gallery.start()
    placeholder = jpeg(0, (8, 16))
    deadline = time.monotonic() + quiet_s
    quiet = await timed_searches(gallery, queries, lambda: time.monotonic() > deadline)
    gallery.index.trained_on = 1  # as if the gallery had grown 4x since the index was trained
    started = time.perf_counter()
    first = await gallery.add([NewItem(placeholder, "JPEG", 8, 16, queries[0])])
    began_rebuild = gallery.rebuilding
    during_task = asyncio.create_task(timed_searches(gallery, queries, lambda: not gallery.rebuilding))
    await asyncio.sleep(5)
    write_started = time.perf_counter()
    second = await gallery.add([NewItem(placeholder, "JPEG", 8, 16, queries[1])])
    write_ms = (time.perf_counter() - write_started) * 1000
    during = await during_task
    rebuild_s = time.perf_counter() - started
    found = gallery.search(queries[1], 1)[0][0] == second[0].id  # the write made during the rebuild was replayed
    for item in (*first, *second):
        await gallery.delete(item.id)
    await gallery.stop()
    return {
        "rebuild_started_in_background": began_rebuild,
        "rebuild_s": round(rebuild_s, 1),
        "search_ms_quiet": latency_quantiles(quiet, 2),
        "search_ms_during_rebuild": latency_quantiles(during, 2),
        "enrolment_during_rebuild_ms": round(write_ms, 1),
        "write_during_rebuild_found_after_swap": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, required=True, help="gallery_scale.py's folder: its store and its real-embedding cache"
    )
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument(
        "--precision", choices=["fp32", "int8"], default="int8", help="the model the store is marked as embedded by"
    )
    parser.add_argument("--quiet-seconds", type=float, default=20)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    model = InferenceModel(args.model, "cpu", precision=args.precision).load()
    store_path = args.work / f"gallery_{args.size}.sqlite3"
    queries = np.load(args.work / f"real_{model.path.stem}.npz")["query"]
    # refuse, never re-embed: the synthetic store's placeholder images would overwrite its embeddings
    settings = Settings(
        store_path=store_path,
        index_type="ivf",
        index_reduce_dim=128,
        ivf_nprobe=64,
        index_rescore_candidates=50,
        on_model_change="refuse",
    )
    gallery = Gallery(GalleryStore(store_path), model, settings)
    started = time.perf_counter()
    gallery.open()
    results = {
        **provenance(),
        "size": args.size,
        "index": "IVF 1024 over PCA-128, nprobe 64, shortlist 50",
        "open_and_build_s": round(time.perf_counter() - started, 1),
        **asyncio.run(scenario(gallery, queries, args.quiet_seconds)),
    }
    gallery.store.close()
    emit(results, args.output)


if __name__ == "__main__":
    main()
