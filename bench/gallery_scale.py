"""Galleries of a million: memory, recall@10 against exact search, and query latency (not a test: it takes long).

The gallery is the service's own SQLite store, filled through ``GalleryStore`` with synthetic embeddings that
have the statistics of real ones. A generator is fitted on the model's embeddings of real training images: a
person's centre is drawn from the between-person distribution (mean + top principal components + isotropic
rest), each sighting adds within-person variation fitted the same way, and every branch slice is
L2-normalised as the contract's are. So the gallery has the spectrum and the person clusters that decide how
well an approximate index and a reduction work, which uniform random vectors (no structure) would not.

1. Exact top-10 of the queries by streaming the whole store (the ground truth); queries are new sightings of
   gallery people from the generator, and real query images (CUHK03-val) embedded by the model.
2. In this process, per index setting: the service's ``VectorIndex`` built from the store as the service builds
   it (a training sample, then the vectors added in chunks), its memory, build time, recall@10 and search
   latency (index + exact re-scoring of the shortlist read from the store), single queries one at a time.
3. A real server (``python -m service``) on the store with the chosen setting: start time, peak memory
   (VmHWM), and client-side p50/p95/p99 of ``POST /query`` (top_k=10) with real images, without and with
   heatmaps, and the recall@10 of its answers for those images.

    python -m bench.gallery_scale --data ../shared/data --work $RUNS/scale --size 1000000 \
        --output bench/results/gallery_1m.json
"""

import argparse
import json
import os
import platform
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List

import numpy as np
from tqdm import tqdm

from client import ReIDClient
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.preprocess import load_for_model
from service.gallery import TRAINING_SAMPLE, exact_scores
from service.index import VectorIndex
from service.inference import InferenceModel
from service.store import GalleryStore, NewItem
from harness.server import ServiceProcess
from bench.common import emit, jpeg, latency_quantiles, memory_kb, synthetic_store

TRAIN_SETS = ("cuhk03-detected", "peta-train", "conreid-train")
PERSON = re.compile(r"^(-?\d+)_")
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


def fill(store_path: Path, generator: EmbeddingGenerator, centres: np.ndarray, size: int, fingerprint: str) -> None:
    store = synthetic_store(store_path, fingerprint, generator.dim)
    placeholder = jpeg(0, (8, 16))
    rng = np.random.default_rng(2)
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


def index_setting(store_path: Path, setting: dict, queries: np.ndarray, truth: np.ndarray, dim: int) -> List[dict]:
    """One index built as the service builds it, then searched with each nprobe x candidates of the setting."""
    store = GalleryStore(store_path)
    index = VectorIndex(
        dim, setting["kind"], "cpu", ivf_nlist=setting.get("nlist", 1024), reduce_dim=setting["reduce_dim"]
    )
    started = time.perf_counter()
    training = store.sample_embeddings(TRAINING_SAMPLE, dim)
    index.rebuild(((ids, vectors) for ids, vectors, _ in store.iter_embeddings(dim)), training)
    built = {
        **setting,
        "built": index.built_kind,
        "build_s": round(time.perf_counter() - started, 1),
        "vectors_in_memory_gb": round(index.index.ntotal * index.index.d * 4 / 1e9, 2),
    }
    del training
    rows = []
    for nprobe in setting.get("nprobe", [None]):
        for candidates in setting.get("candidates", [100]):
            if nprobe is not None:
                index.set_nprobe(nprobe)
            index.rescore_candidates = candidates
            found, times = [], []
            for query in queries:
                begin = time.perf_counter()
                hits = index.search(query, 10, exact=partial(exact_scores, store, query))
                times.append((time.perf_counter() - begin) * 1000)
                found.append([i for i, _ in hits])
            rows.append(
                {
                    **built,
                    "nprobe": nprobe,
                    "candidates": candidates,
                    "recall_at_10": round(recall(found, truth), 4),
                    "search_latency": latency_quantiles(times, digits=2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    store.close()
    return rows


def peak_memory_gb(pid: int) -> Dict[str, float]:
    return {f"{field}_gb": round(memory_kb(pid, field) / 1e6, 2) for field in ("VmHWM", "VmRSS")}


def server_figures(args, store_path: Path, setting: dict, images: List[bytes], truth: np.ndarray) -> dict:
    env = {
        "index_type": setting["kind"],
        "index_reduce_dim": setting["reduce_dim"],
        "index_rescore_candidates": setting["candidates"][0],
        "ivf_nlist": setting.get("nlist", 1024),
        "ivf_nprobe": setting.get("nprobe", [32])[0],
        "intra_op_threads": 0,
        "model_instances": 0,
        "max_top_k": 100,
        "max_heatmap_matches": 10,
        "model_precision": args.precision,
    }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with the training sets and cuhk03-detected/query"
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="where the store (about 15 GB per million 3840-d items) and caches go"
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--size", type=int, default=1_000_000)
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
        help="JSON list of index settings for the in-process part, each built once and searched with "
        "every nprobe x "
        "candidates; the first setting's first nprobe and candidates are also served",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the real server's part")
    parser.add_argument(
        "--server-only", action="store_true", help="skip the in-process settings: serve the first setting only"
    )
    parser.add_argument("--fill-only", action="store_true", help="fill the store (resumable) and stop")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = InferenceModel(args.model, "cpu", precision=args.precision).load()
    dim, branches = model.contract.embedding_dim, model.contract.num_branches

    cache = (
        args.work / f"real_{model.path.stem}.npz"
    )  # the served file's own embeddings: int8 queries are judged against int8 truth
    if not cache.exists():
        paths = [
            p
            for name in TRAIN_SETS
            for p in market_images(args.data / name, "bounding_box_train", args.real_images // len(TRAIN_SETS), 0)
        ]
        query_paths = market_images(args.data / "cuhk03-detected", "query", 100, 1)
        np.savez(
            cache,
            train=embed(model, paths, "real training images"),
            persons=[f"{p.parent.parent.name}/{PERSON.match(p.name).group(1)}" for p in paths],
            query=embed(model, query_paths, "real query images"),
            query_paths=[str(p) for p in query_paths],
        )
    real = np.load(cache)
    generator = EmbeddingGenerator(real["train"], real["persons"], branches)
    rng = np.random.default_rng(1)
    centres = generator.centres(max(1, args.size // SIGHTINGS_PER_PERSON), rng)
    store_path = args.work / f"gallery_{args.size}.sqlite3"
    fill(store_path, generator, centres, args.size, model.fingerprint)
    if args.fill_only:
        return

    synthetic_queries = generator.sightings(centres[rng.integers(0, len(centres), args.queries)], rng)
    truth = exact_top10(store_path, np.concatenate([synthetic_queries, real["query"]]), dim)
    results = {
        "model": model.path.name,
        "precision": args.precision,
        "embedding_dim": dim,
        "size": args.size,
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "store_file_gb": round(store_path.stat().st_size / 1e9, 2),
        "generator_fitted_on": {"training_images": len(real["train"]), "query_images": len(real["query"])},
        "settings": [],
    }
    results["load_average_at_start"] = os.getloadavg()
    for setting in [] if args.server_only else json.loads(args.settings):
        results["settings"] += index_setting(store_path, setting, synthetic_queries, truth[: args.queries], dim)
    if not args.no_server:
        images = [Path(p).read_bytes() for p in real["query_paths"]]
        results["server"] = server_figures(
            args, store_path, json.loads(args.settings)[0], images, truth[args.queries :]
        )
    results["load_average_at_end"] = os.getloadavg()
    emit(results, args.output)


if __name__ == "__main__":
    main()
