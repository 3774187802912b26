"""Galleries of a million: memory, recall@10 against exact search, and query latency (not a test: it takes long).

The gallery is the service's own SQLite store, filled through ``GalleryStore`` with synthetic embeddings that
have the statistics of real ones. A generator is fitted on the model's embeddings of real training images: a
person's centre is drawn from the between-person distribution (mean + top principal components + isotropic
rest), each sighting adds within-person variation fitted the same way, and every branch slice is
L2-normalised as the contract's are. So the gallery has the spectrum and the person clusters that decide how
well an approximate index and a reduction work, which uniform random vectors (no structure) would not.

With ``--real-gallery`` the store first holds every real crop there is (the training pool and the
validation sets' galleries: their images, person and camera ids, the model's embeddings), and the synthetic
items fill it up to ``--size``; the real queries are then the validation sets' query crops, whose true
matches are real crops in the gallery. ``--size 0`` keeps the real crops alone: the largest real gallery.

1. Exact top-10 of the queries by streaming the whole store (the ground truth); queries are new sightings of
   gallery people from the generator, and real query images embedded by the model (100 of CUHK03-val's, or
   with ``--real-gallery`` every query crop of CUHK03-val, PRID and GRID).
2. In this process, per index setting (kind ``auto`` decides by the store's size, as the service does): the
   service's ``VectorIndex`` built from the store as the service builds it (a training sample, then the
   vectors added in chunks), its memory, build time, recall@10 of the synthetic and of the real queries, and
   search latency (index + exact re-scoring of the shortlist read from the store), one query at a time.
3. A real server (``python -m service``) on the store with the chosen setting: start time, peak memory
   (VmHWM), and client-side p50/p95/p99 of ``POST /query`` (top_k=10) with real images, without and with
   heatmaps, and the recall@10 of its answers for those images.

    python -m bench.gallery_scale --data $DATA --work $RUNS/scale --size 1000000 \
        --output bench/results/gallery_1m.json
    python -m bench.gallery_scale --data $DATA --work $RUNS/scale --real-gallery --size 1000000 ...
    python -m bench.gallery_scale --write-docs bench/results/gallery_1m_real.json   # docs/results.md's table
"""

import argparse
import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from client import ReIDClient
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.files import sha256_of
from model_zoo.preprocess import load_for_model
from service.gallery import TRAINING_SAMPLE, exact_scores
from service.index import VectorIndex
from service.inference import InferenceModel
from service.store import GalleryStore, NewItem
from harness.server import ServiceProcess
from bench.common import (
    RESULTS_PAGE,
    DocsTables,
    emit,
    jpeg,
    latency_quantiles,
    memory_kb,
    synthetic_store,
)
from model_zoo.provenance import provenance

TRAIN_SETS = ("cuhk03-detected", "peta-train", "conreid-train")
VALIDATION_SETS = ("cuhk03-detected", "prid", "grid")
PERSON = re.compile(r"^(-?\d+)_")
CAMERA = re.compile(r"_c(\d+)")
EVERY = 10**9
SIGHTINGS_PER_PERSON = 10
COMPONENTS = 128


def market_images(root: Path, folder: str, count: int, seed: int) -> List[Path]:
    files = sorted(p for p in (root / folder).glob("*.jpg") if not p.name.startswith("-1"))
    picked = np.random.default_rng(seed).choice(len(files), min(count, len(files)), replace=False)
    return [files[i] for i in sorted(picked)]


def embed(model: InferenceModel, paths: List[Path], desc: str) -> np.ndarray:
    height, width = model.input_size
    out = []
    for start in tqdm(range(0, len(paths), 32), desc=desc, leave=False):
        batch = np.stack([load_for_model(p.read_bytes(), height, width) for p in paths[start : start + 32]])
        out.append(model.predict(batch, with_maps=False)[0])
    return np.concatenate(out)


class EmbeddingGenerator:
    """Person centres and sightings with the between- and within-person statistics of real embeddings."""

    def __init__(self, embeddings: np.ndarray, persons: np.ndarray, branches: int):
        self.dim, self.branches = embeddings.shape[1], branches
        keys, inverse, counts = np.unique(persons, return_inverse=True, return_counts=True)
        means = np.stack([embeddings[inverse == k].mean(0) for k in range(len(keys))])
        repeated = counts[inverse] > 1
        self.mean = means.mean(0)
        self.between = principal(means - self.mean)
        self.within = principal((embeddings - means[inverse])[repeated])

    def centres(self, count: int, rng) -> np.ndarray:
        return self.mean + sample(self.between, count, rng)

    def sightings(self, centres: np.ndarray, rng) -> np.ndarray:
        rows = centres + sample(self.within, len(centres), rng)
        slices = rows.reshape(len(rows), self.branches, -1)
        return (slices / np.linalg.norm(slices, axis=2, keepdims=True)).reshape(len(rows), -1).astype(np.float32)


def principal(centred: np.ndarray):
    """(axes [C, D], their standard deviations, the standard deviation of the rest per dimension)."""
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    std = singular / np.sqrt(len(centred))
    kept = min(COMPONENTS, len(std))
    rest = np.sqrt(max(0.0, (std[kept:] ** 2).sum()) / centred.shape[1])
    return axes[:kept], std[:kept], rest


def sample(model, count: int, rng) -> np.ndarray:
    axes, std, rest = model
    return (rng.standard_normal((count, len(std))) * std) @ axes + rest * rng.standard_normal((count, axes.shape[1]))


def real_crops(data: Path) -> Dict[str, List[Path]]:
    """Every real crop: the gallery (the training pool and the validation sets' galleries) and the queries."""
    return {
        "gallery": [p for name in TRAIN_SETS for p in market_images(data / name, "bounding_box_train", EVERY, 0)]
        + [p for name in VALIDATION_SETS for p in market_images(data / name, "bounding_box_test", EVERY, 0)],
        "query": [p for name in VALIDATION_SETS for p in market_images(data / name, "query", EVERY, 0)],
    }


def real_item(path: Path, vector: np.ndarray) -> NewItem:
    """A real crop as the service stores it: its image, its set-qualified person id and its camera."""
    with Image.open(path) as image:
        width, height = image.size
    camera = CAMERA.search(path.name)
    return NewItem(
        path.read_bytes(),
        "JPEG",
        width,
        height,
        vector,
        person_id=f"{path.parent.parent.name}/{PERSON.match(path.name).group(1)}",
        camera_id=f"{path.parent.parent.name}/{camera.group(1) if camera else '?'}",
    )


def add_real(store: GalleryStore, paths: List[Path], vectors: np.ndarray) -> None:
    for start in tqdm(range(0, len(paths), 1000), desc="enrolling the real crops", leave=False):
        store.add([real_item(p, v) for p, v in zip(paths[start : start + 1000], vectors[start : start + 1000])])


def fill(
    store_path: Path,
    generator: EmbeddingGenerator,
    centres: np.ndarray,
    size: int,
    fingerprint: str,
    real: Optional[dict] = None,
) -> None:
    """The store filled to ``size`` items (resumable): the real crops first when given, synthetic items after."""
    store = synthetic_store(store_path, fingerprint, generator.dim)
    placeholder = jpeg(0, (8, 16))
    rng = np.random.default_rng(2)
    if real is not None and store.count() == 0:
        add_real(store, [Path(p) for p in real["gallery_paths"]], real["gallery"])
    have = store.count()
    for start in tqdm(
        range(have, size, 5000), desc=f"filling the store to {size}", initial=have // 5000, total=-(-size // 5000)
    ):
        persons = rng.integers(0, len(centres), min(5000, size - start))
        vectors = generator.sightings(centres[persons], rng)
        store.add(
            [
                NewItem(placeholder, "JPEG", 8, 16, v, person_id=f"s{p}", camera_id=f"c{p % 8}")
                for p, v in zip(persons, vectors)
            ]
        )
    store.close()


def exact_top10(store_path: Path, queries: np.ndarray, dim: int) -> np.ndarray:
    """[Q, 10] ids of the exact top 10 (inner product), streaming the store once."""
    store = GalleryStore(store_path)
    best_ids = np.zeros((len(queries), 0), np.int64)
    best = np.zeros((len(queries), 0), np.float32)
    for ids, vectors, _ in tqdm(
        store.iter_embeddings(dim, chunk=8192), desc="exact top-10", total=-(-store.count() // 8192)
    ):
        scores = np.concatenate([best, queries @ vectors.T], axis=1)
        pool = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        keep = np.argsort(-scores, axis=1)[:, :10]
        best, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(pool, keep, 1)
    store.close()
    return best_ids


def recall(found: List[List[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))


def index_setting(
    store_path: Path, setting: dict, queries: Dict[str, np.ndarray], truth: Dict[str, np.ndarray], dim: int
) -> List[dict]:
    """One index built as the service builds it, then searched with each nprobe x candidates of the setting:
    recall@10 per query set, latency over all of them."""
    store = GalleryStore(store_path)
    index = VectorIndex(
        dim,
        setting["kind"],
        "cpu",
        ivf_nlist=setting.get("nlist", 1024),
        hnsw_m=setting.get("m", 32),
        reduce_dim=setting.get("reduce_dim", 0),
    )
    index.planned_size = store.count()
    started = time.perf_counter()
    training = store.sample_embeddings(TRAINING_SAMPLE, dim)
    index.rebuild(((ids, vectors) for ids, vectors, _ in store.iter_embeddings(dim)), training)
    built = {
        **setting,
        "built": index.built_kind,
        "lists": index.lists,
        "build_s": round(time.perf_counter() - started, 1),
        "vectors_in_memory_gb": round(index.index.ntotal * index.index.d * 4 / 1e9, 2),
    }
    del training
    rows = []
    # the breadths given (nprobe or ef_search), recorded under the name of what the index built
    breadth_name = "ef_search" if index.built_kind == "hnsw" else "nprobe"
    for breadth in setting.get("nprobe", setting.get("ef_search", [None])):
        for candidates in setting.get("candidates", [100]):
            if breadth is not None:
                index.set_search_breadth(breadth)
            index.rescore_candidates = candidates
            given = {key: value for key, value in built.items() if key not in ("nprobe", "ef_search")}
            row, times = {**given, breadth_name: breadth, "candidates": candidates}, []
            for name, vectors in queries.items():
                found = []
                for query in vectors:
                    begin = time.perf_counter()
                    hits = index.search(query, 10, exact=partial(exact_scores, store, query))
                    times.append((time.perf_counter() - begin) * 1000)
                    found.append([i for i, _ in hits])
                row[f"recall_at_10_{name}"] = round(recall(found, truth[name]), 4)
            rows.append({**row, "search_latency": latency_quantiles(times, digits=2)})
            print(json.dumps(rows[-1]), flush=True)
    store.close()
    return rows


def peak_memory_gb(pid: int) -> Dict[str, float]:
    return {f"{field}_gb": round(memory_kb(pid, field) / 1e6, 2) for field in ("VmHWM", "VmRSS")}


# a setting's keys -> the service settings they set when given (the service's defaults otherwise)
SERVED_SETTINGS = {
    "reduce_dim": "index_reduce_dim",
    "candidates": "index_rescore_candidates",
    "nlist": "ivf_nlist",
    "nprobe": "ivf_nprobe",
    "m": "hnsw_m",
    "ef_search": "hnsw_ef_search",
    "model_instances": "model_instances",
    "intra_op_threads": "intra_op_threads",
}


def server_figures(args, store_path: Path, setting: dict, images: List[bytes], truth: np.ndarray) -> dict:
    given = {key: value[0] if isinstance(value, list) else value for key, value in setting.items()}
    env = {
        "index_type": setting["kind"],
        **{name: given[key] for key, name in SERVED_SETTINGS.items() if key in given},
        "max_top_k": 100,
        "max_heatmap_matches": 10,
        "model_precision": args.precision,
    }
    env.setdefault("intra_op_threads", 0)  # 0: the service's own thread plan (the test helper pins one thread)
    env.setdefault("model_instances", 0)
    server = ServiceProcess(args.model, store_path, **env)
    started = time.perf_counter()
    server.start(timeout=3600)
    try:
        figures = {"setting": setting, "start_s": round(time.perf_counter() - started, 1)}
        with ReIDClient(server.url, timeout=120) as reid:
            answers = [
                [m.id for m in reid.query(("q.jpg", image), top_k=10, heatmaps=False).matches] for image in images
            ]
            figures["recall_at_10_real_queries"] = round(recall(answers, truth), 4)
            for heatmaps in (False, True):
                times = []
                for i in range(args.http_queries + 2):
                    begin = time.perf_counter()
                    reid.query(("q.jpg", images[i % len(images)]), top_k=10, heatmaps=heatmaps)
                    if i >= 2:
                        times.append((time.perf_counter() - begin) * 1000)
                figures[f"query_heatmaps_{heatmaps}"] = latency_quantiles(times, digits=2)
        figures["server_memory"] = peak_memory_gb(server.process.pid)
    finally:
        server.stop()
    return figures


def _quantiles(latency: dict) -> str:
    return f"{latency['p50_ms']} / {latency['p95_ms']} / {latency['p99_ms']}"


def breadth(setting: dict):
    """A setting's nprobe (IVF) or efSearch (HNSW): one value, or the first of a list."""
    value = setting.get("nprobe", setting.get("ef_search"))
    return value[0] if isinstance(value, list) else value


def scale_table(results: dict) -> str:
    """A docs table of a result file: each in-process setting, then the real server's row when there is one."""
    lines = [
        "| index, as built (in process, one query at a time) | nprobe / efSearch | recall@10 synthetic / real queries "
        "| search p50 / p95 / p99 ms | vectors in memory | built in |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["settings"]:
        built = row["built"] + (f", {row['lists']} lists" if row.get("lists") else "")
        searched = (row["built"] != "flat" and breadth(row)) or "-"  # an exact scan has no breadth
        lines.append(
            f"| {row['kind']}: {built} | {searched} | {row['recall_at_10_synthetic_queries']} / "
            f"{row['recall_at_10_real_queries']} | {_quantiles(row['search_latency'])} | "
            f"{row['vectors_in_memory_gb']} GB | {row['build_s']} s |"
        )
    server = results.get("server")
    if server:
        setting = server["setting"]
        plan = "".join(f", {key} {setting[key]}" for key in ("model_instances", "intra_op_threads") if key in setting)
        lines.append(
            f"| **served** ({setting['kind']}{plan}, `POST /query` top 10 from the client, query embedding included; "
            f"with heatmaps p50 {server['query_heatmaps_True']['p50_ms']} ms) | {breadth(setting) or '-'} "
            f"| real queries: **{server['recall_at_10_real_queries']}** | "
            f"**{_quantiles(server['query_heatmaps_False'])}** | {server['server_memory']['VmHWM_gb']} GB peak "
            f"| ready after {server['start_s']} s |"
        )
    return "\n".join(lines)


DOCS_TABLES = DocsTables.on_page(
    RESULTS_PAGE,
    scale_table,
    {
        "gallery_real.json": "real gallery table",
        "gallery_real_ensemble.json": "default real gallery table",
        "gallery_1m_real.json": "million gallery table",
        "gallery_1m_real_one_call.json": "million gallery one call table",
        "gallery_1m_real_served.json": "million gallery served table",
        "gallery_1m_real_served_sleeping.json": "million gallery served sleeping table",
    },
)


def real_embeddings(args, model: InferenceModel) -> dict:
    """The model's embeddings of the real images (cached in the work folder per model file, so int8 queries are
    judged against int8 truth): the generator's training sample, the real queries and, with --real-gallery,
    every real crop."""
    cache = args.work / f"real_{'all_' if args.real_gallery else ''}{model.path.stem}.npz"
    if not cache.exists():
        paths = [
            p
            for name in TRAIN_SETS
            for p in market_images(args.data / name, "bounding_box_train", args.real_images // len(TRAIN_SETS), 0)
        ]
        crops = real_crops(args.data) if args.real_gallery else {}
        query_paths = crops.get("query") or market_images(args.data / "cuhk03-detected", "query", 100, 1)
        gallery_paths = crops.get("gallery", [])
        gallery = embed(model, gallery_paths, "real gallery images") if gallery_paths else np.zeros((0, 0))
        row = {path: i for i, path in enumerate(gallery_paths)}  # the training sample is among them: embedded once
        np.savez(
            cache,
            train=gallery[[row[p] for p in paths]] if row else embed(model, paths, "real training images"),
            persons=[f"{p.parent.parent.name}/{PERSON.match(p.name).group(1)}" for p in paths],
            query=embed(model, query_paths, "real query images"),
            query_paths=[str(p) for p in query_paths],
            gallery=gallery,
            gallery_paths=[str(p) for p in gallery_paths],
        )
    return dict(np.load(cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with the training sets and the validation sets")
    parser.add_argument(
        "--work",
        type=Path,
        help="where the store (about 15 GB per million 3840-d items, 1.6 GB at 256-d) and caches go",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--size", type=int, default=1_000_000, help="items in the store, real crops included")
    parser.add_argument(
        "--real-gallery",
        action="store_true",
        help="the store holds every real crop first, the real queries are every validation query crop",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="the model file served (REID_MODEL_PRECISION) and embedding the queries; an existing "
        "store is marked as its",
    )
    parser.add_argument("--real-images", type=int, default=3000, help="training images the generator is fitted on")
    parser.add_argument("--queries", type=int, default=200, help="synthetic queries for the in-process settings")
    parser.add_argument("--http-queries", type=int, default=100, help="queries per server latency figure")
    parser.add_argument(
        "--settings",
        default='[{"kind": "ivf", "reduce_dim": 256, "nlist": 1024, "nprobe": [32, 16, 64], "candidates": [100, 50]}]',
        help="JSON list of index settings for the in-process part (kind, nlist, nprobe, m, ef_search, "
        "reduce_dim, candidates), each built once and searched with every nprobe (IVF) or ef_search (HNSW) x "
        "candidates; the first setting's first nprobe or ef_search and candidates are also served (with its "
        "model_instances and intra_op_threads when given: the service's REID_ settings, 0 = its own plan)",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the real server's part")
    parser.add_argument(
        "--server-only", action="store_true", help="skip the in-process settings: serve the first setting only"
    )
    parser.add_argument("--fill-only", action="store_true", help="fill the store (resumable) and stop")
    parser.add_argument("--output", type=Path)
    DOCS_TABLES.add_option(parser)
    args = parser.parse_args()
    if args.write_docs:
        return DOCS_TABLES.write(args.write_docs)
    if not (args.data and args.work):
        parser.error("--data and --work are required to measure")
    args.work.mkdir(parents=True, exist_ok=True)
    model = InferenceModel(args.model, "cpu", precision=args.precision).load()
    dim, branches = model.contract.embedding_dim, model.contract.num_branches

    real = real_embeddings(args, model)
    size = max(args.size, len(real["gallery_paths"]))
    generator = EmbeddingGenerator(real["train"], real["persons"], branches)
    rng = np.random.default_rng(1)
    centres = generator.centres(max(1, size // SIGHTINGS_PER_PERSON), rng)
    store_path = args.work / f"gallery_{'real_' if args.real_gallery else ''}{size}.sqlite3"
    fill(store_path, generator, centres, size, model.fingerprint, real if args.real_gallery else None)
    if args.fill_only:
        return

    queries = {
        "synthetic_queries": generator.sightings(centres[rng.integers(0, len(centres), args.queries)], rng),
        "real_queries": real["query"],
    }
    found = exact_top10(store_path, np.concatenate(list(queries.values())), dim)
    truth = {"synthetic_queries": found[: args.queries], "real_queries": found[args.queries :]}
    results = {
        **provenance(),
        "model": {"file": model.path.name, "sha256": sha256_of(model.path)},
        "precision": args.precision,
        "embedding_dim": dim,
        "size": size,
        "real_items": len(real["gallery_paths"]),
        "store_file_gb": round(store_path.stat().st_size / 1e9, 2),
        "generator_fitted_on": {"training_images": len(real["train"]), "query_images": len(real["query"])},
        "settings": [],
    }
    for setting in [] if args.server_only else json.loads(args.settings):
        results["settings"] += index_setting(store_path, setting, queries, truth, dim)
    if not args.no_server:
        images = [Path(p).read_bytes() for p in real["query_paths"]]
        results["server"] = server_figures(
            args, store_path, json.loads(args.settings)[0], images, truth["real_queries"]
        )
    emit(results, args.output)


if __name__ == "__main__":
    main()
