"""Service parts without a server: the index on every type, the micro-batcher, the gallery's group commit,
heatmaps, provider choice."""

import asyncio
import io
import sqlite3
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from service.batching import MicroBatcher
from service.gallery import Gallery
from service.heatmaps import overlay, png_base64
from service.index import VectorIndex
from service.inference import CPU, CUDA, InferenceModel, choose_providers, cpu_cores, plan_threads
from service.settings import Settings
from service.store import GalleryStore, NewItem


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_index_type_finds_added_vectors_and_forgets_deleted_ones(kind):
    vectors = unit_rows(2000, 16)
    ids = np.arange(10, 2010, dtype=np.int64)
    index = VectorIndex(16, kind, "cpu", ivf_nlist=16, ivf_nprobe=16)
    index.rebuild([(ids[:1500], vectors[:1500])])
    index.add(ids[1500:], vectors[1500:])
    assert index.size == 2000
    assert index.built_kind == kind and index.lists == (16 if kind == "ivf" else None)
    assert index.search(vectors[1700], 1)[0][0] == 1710
    index.remove(1710)
    assert 1710 not in [i for i, _ in index.search(vectors[1700], 5)]
    assert index.size == 1999
    index.set_search_breadth(4)
    if kind == "ivf":  # each search now visits 4 of the 16 lists, and later builds keep it
        assert index._inner.nprobe == 4 and index.ivf_nprobe == 4
    if kind == "hnsw":
        assert index._inner.hnsw.efSearch == 4 and index.hnsw_ef_search == 4


def test_tombstones_trigger_a_rebuild_and_filters_widen_the_search():
    vectors = unit_rows(100, 8)
    index = VectorIndex(8, "flat", "cpu")
    index.rebuild([(np.arange(100), vectors)])
    for i in range(21):
        index.remove(i)
    assert index.needs_rebuild
    only_odd_far = index.search(vectors[50], 5, accept=lambda i, s: i % 2 == 1 and i > 90)
    assert [i for i, _ in only_odd_far] and all(i % 2 == 1 and i > 90 for i, _ in only_odd_far)
    assert sorted(i for i, _ in only_odd_far) == [91, 93, 95, 97, 99]
    assert index.search(vectors[50], 5, accept=lambda i, s: i == 3) == []  # deleted: never returned


def test_an_ivf_index_starts_exact_and_is_trained_once_the_gallery_is_large_enough():
    index = VectorIndex(8, "ivf", "cpu", ivf_nlist=8)
    index.rebuild([])
    assert index.built_kind == "flat" and not index.needs_rebuild
    index.add(np.arange(1000), unit_rows(1000, 8))
    assert index.needs_rebuild


class CountingModel:
    """Stands in for InferenceModel: records the batch sizes it is called with."""

    def __init__(self):
        self.calls = []

    def predict(self, images, with_maps=True, wide=False):
        self.calls.append(len(images))
        embedding = images.reshape(len(images), -1)[:, :4].astype(np.float32)
        return embedding, (embedding[:, None] if with_maps else None)


def test_the_batcher_embeds_concurrent_requests_together_and_splits_large_ones():
    model = CountingModel()
    observed = []

    async def scenario():
        batcher = MicroBatcher(
            model,
            max_batch_size=8,
            max_wait_s=0.05,
            observe=lambda size, waits, seconds: observed.append((size, len(waits))),
        )
        await batcher.start()
        images = [np.full((1, 2, 2, 3), i, np.uint8) for i in range(6)]
        results = await asyncio.gather(*(batcher.embed(x) for x in images))
        big, _ = await batcher.embed(np.zeros((20, 2, 2, 3), np.uint8))
        await batcher.stop()
        return results, big

    results, big = asyncio.run(scenario())
    assert [int(r[0][0, 0]) for r in results] == list(range(6))  # each request gets its own rows back
    assert model.calls[0] == 6 and observed[0] == (6, 6)
    assert model.calls[1:] == [8, 8, 4] and big.shape == (20, 4)


def test_a_lone_request_is_split_over_the_model_instances_and_runs_at_once():
    import threading

    class PairedModel(CountingModel):
        both_running = threading.Barrier(2, timeout=10)  # passes only when two calls are in flight together

        def predict(self, images, with_maps=True, wide=False):
            self.both_running.wait()
            return super().predict(images, with_maps)

    model = PairedModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.05, instances=2)
        await batcher.start()
        lone, _ = await batcher.embed(np.arange(4, dtype=np.uint8).repeat(12).reshape(4, 2, 2, 3))
        await batcher.stop()
        return lone

    assert asyncio.run(scenario())[:, 0].tolist() == [0, 1, 2, 3]
    assert model.calls == [2, 2]  # the 4-image request as two calls of 2, at once (or the barrier breaks)


def test_a_batch_that_finds_the_model_idle_runs_wide_and_concurrent_parts_do_not():
    class WideModel(CountingModel):
        wide_calls = []

        def predict(self, images, with_maps=True, wide=False):
            self.wide_calls.append(wide)
            time.sleep(0.05)  # a real call's length: the other part is collected while this one runs
            return super().predict(images, with_maps)

    model = WideModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.05, instances=2)
        await batcher.start()
        await batcher.embed(np.zeros((1, 2, 2, 3), np.uint8))  # a lone query: every thread
        await batcher.embed(np.zeros((4, 2, 2, 3), np.uint8))  # two parts, one per model thread
        await batcher.stop()

    asyncio.run(scenario())
    assert model.wide_calls == [True, False, False]


def test_with_two_model_threads_a_batch_takes_its_share_of_the_waiting_images():
    """Images that queued while both threads were busy are shared between them, not all taken by the first
    thread to finish: the other would then idle while those clients sent their next requests."""
    import threading

    release, entered = threading.Event(), threading.Semaphore(0)

    class HeldModel(CountingModel):
        def predict(self, images, with_maps=True, wide=False):
            entered.release()
            release.wait(10)
            return super().predict(images, with_maps)

    model = HeldModel()

    async def scenario():
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.05, instances=2)
        await batcher.start()
        one = lambda: batcher.embed(np.zeros((1, 2, 2, 3), np.uint8))  # noqa: E731
        running = [asyncio.ensure_future(one()) for _ in range(2)]
        for _ in range(2):  # each thread took one image and holds it in the model
            assert await asyncio.to_thread(entered.acquire, True, 10)
        waiting = [asyncio.ensure_future(one()) for _ in range(4)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*running, *waiting)
        await batcher.stop()

    asyncio.run(scenario())
    assert sorted(model.calls) == [1, 1, 1, 1, 2]  # the 4 that waited: 2 + 1 + 1, not one call of 4


def test_past_the_queue_limit_a_request_is_refused_at_once_and_the_queue_drains():
    import threading

    from service.batching import Overloaded

    entered, release = threading.Event(), threading.Event()

    class BlockingModel(CountingModel):
        def predict(self, images, with_maps=True, wide=False):
            entered.set()
            release.wait(10)
            return super().predict(images, with_maps)

    async def scenario():
        batcher = MicroBatcher(BlockingModel(), max_batch_size=2, max_wait_s=0.0, max_queued_images=3)
        await batcher.start()
        running = asyncio.ensure_future(batcher.embed(np.zeros((2, 2, 2, 3), np.uint8)))
        await asyncio.to_thread(entered.wait, 10)  # that batch is in the model: nothing is queued
        queued = [asyncio.ensure_future(batcher.embed(np.zeros((n, 2, 2, 3), np.uint8))) for n in (2, 1)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.embed(np.zeros((1, 2, 2, 3), np.uint8))  # 3 waiting + 1 > 3
        release.set()
        done = await asyncio.gather(running, *queued)
        after, _ = await batcher.embed(np.zeros((3, 2, 2, 3), np.uint8))  # drained: room for 3 again
        await batcher.stop()
        return [len(d[0]) for d in done], len(after)

    assert asyncio.run(scenario()) == ([2, 2, 1], 3)


def test_a_model_failure_fails_the_batch_not_the_batcher():
    class Failing(CountingModel):
        def predict(self, images, with_maps=True, wide=False):
            if images[0, 0, 0, 0] == 1:
                raise RuntimeError("boom")
            return super().predict(images, with_maps)

    async def scenario():
        batcher = MicroBatcher(Failing(), max_batch_size=4, max_wait_s=0.0)
        await batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.embed(np.ones((1, 2, 2, 3), np.uint8))
        ok, _ = await batcher.embed(np.zeros((1, 2, 2, 3), np.uint8))
        await batcher.stop()
        return ok

    assert asyncio.run(scenario()).shape == (1, 4)


def open_gallery(tmp_path, dim=4):
    # The gallery needs only the model's shape and fingerprint; store and index are the real ones.
    shape = dict(num_branches=1, branch_dim=dim, map_height=2, map_width=1)
    model = SimpleNamespace(
        contract=SimpleNamespace(embedding_dim=dim, **shape), fingerprint="f" * 64, optional_maps={}
    )
    gallery = Gallery(GalleryStore(tmp_path / "g.sqlite3"), model, Settings(store_path=tmp_path / "g.sqlite3"))
    gallery.open(progress=False)
    return gallery


def item(seed: int, image=b"jpeg bytes") -> NewItem:
    return NewItem(image, "JPEG", 1, 1, unit_rows(1, 4, seed)[0])


@pytest.mark.parametrize("build_reads", ["before", "after"])
def test_a_background_rebuild_serves_queries_meanwhile_and_keeps_every_write_made_during_it(
    tmp_path, monkeypatch, build_reads
):
    """Writes while the new index is built: the build's read of the store comes before them (so they must be
    replayed onto it) or after them (so replaying them must change nothing)."""
    import service.gallery

    gallery = open_gallery(tmp_path)
    reached, release = threading.Event(), threading.Event()
    build = service.gallery.built_index

    def gated_build(*args):
        if build_reads == "before":
            result = build(*args)
            reached.set()
            release.wait(10)
            return result
        reached.set()
        release.wait(10)
        return build(*args)

    monkeypatch.setattr(service.gallery, "built_index", gated_build)
    vectors = unit_rows(12, 4, seed=7)

    async def scenario():
        await gallery.start()
        ids = [
            (await gallery.add([NewItem(b"jpeg", "JPEG", 1, 1, vectors[i], person_id="gone" if i == 8 else None)]))[
                0
            ].id
            for i in range(10)
        ]
        for item_id in ids[:3]:  # 3 tombstones in 10 vectors: past COMPACT_FRACTION, a rebuild starts
            await gallery.delete(item_id)
        await asyncio.to_thread(reached.wait, 10)
        during = {"rebuilding": gallery.rebuilding, "found": gallery.search(vectors[5], 1)[0][0] == ids[5]}
        added = (await gallery.add([NewItem(b"jpeg", "JPEG", 1, 1, vectors[11])]))[0].id
        await gallery.delete(ids[3])
        erased = await gallery.erase_person("gone")
        release.set()
        while gallery.rebuilding:
            await asyncio.sleep(0.01)
        after = {item_id for item_id, _ in gallery.search(vectors[0], 20)}
        top = gallery.search(vectors[11], 1)[0]
        await gallery.stop()
        return ids, during, added, erased, after, top

    ids, during, added, erased, after, top = asyncio.run(scenario())
    assert during == {"rebuilding": True, "found": True}  # the loop was free and the old index answered
    assert erased == [ids[8]]
    expected = {*ids[4:8], ids[9], added}
    assert after == expected == set(gallery.labels) == {i.id for i in gallery.store.list(100, 0)[1]}
    assert top[0] == added and top[1] == pytest.approx(1.0, abs=1e-6)
    # the new index holds none of the first three deletes; ids[3] is a tombstone only if the build had read it
    assert gallery.index.size == 6 and len(gallery.index.tombstones) == (1 if build_reads == "before" else 0)


def test_concurrent_writes_share_one_commit_and_a_failing_one_fails_alone(tmp_path, monkeypatch):
    gallery = open_gallery(tmp_path)
    groups = []
    commit_group = gallery.store.commit_group
    monkeypatch.setattr(
        gallery.store, "commit_group", lambda writes: groups.append(len(writes)) or commit_group(writes)
    )

    async def scenario():
        await gallery.start()
        first = await gallery.add([item(0)])
        # image NULL breaks a NOT NULL column: that request, both of its items, must fail and leave no trace
        bad = [item(1), item(2, image=None)]
        results = await asyncio.gather(
            *(gallery.add([item(10 + i)]) for i in range(8)),
            gallery.add(bad),
            gallery.delete(first[0].id),
            return_exceptions=True,
        )
        await gallery.stop()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[8], sqlite3.IntegrityError) and results[9] is True
    assert groups == [1, 10]  # the first write alone, then the ten concurrent ones in one transaction
    added = [items[0].id for items in results[:8]]
    assert sorted(gallery.store.get_many_with_embeddings(added, 4)) == sorted(added) and gallery.store.count() == 8
    assert gallery.index.size == 8 and set(gallery.labels) == set(added)
    found = gallery.search(unit_rows(1, 4, 13)[0], 1)
    assert found[0][0] == added[3] and found[0][1] == pytest.approx(1.0, abs=1e-5)


def test_a_failed_index_update_rebuilds_the_index_and_the_write_stands(tmp_path, monkeypatch):
    gallery = open_gallery(tmp_path)

    class BrokenFaissIndex:  # the rebuild replaces it with a working one
        def add_with_ids(self, vectors, ids):
            raise RuntimeError("faiss failure")

    monkeypatch.setattr(gallery.index, "index", BrokenFaissIndex())

    async def scenario():
        await gallery.start()
        stored = await gallery.add([item(0), item(1)])
        await gallery.stop()
        return stored

    stored = asyncio.run(scenario())
    assert gallery.index.size == 2 and gallery.search(unit_rows(1, 4, 1)[0], 1)[0][0] == stored[1].id


def test_a_slow_search_never_holds_the_loop_and_the_index_never_changes_under_it(tmp_path, monkeypatch):
    """A 100k exact scan took 120 ms on the event loop, holding every request. Searches now run in worker
    threads: the loop keeps turning while one runs, and a write's index change waits for it to end."""
    gallery = open_gallery(tmp_path)
    searching, release, events = threading.Event(), threading.Event(), []
    search = gallery.index.search

    def slow_search(*args, **kwargs):
        searching.set()
        release.wait(10)
        events.append("search ends")
        return search(*args, **kwargs)

    async def scenario():
        await gallery.start()
        [stored] = await gallery.add([item(0)])
        monkeypatch.setattr(gallery.index, "search", slow_search)
        query = asyncio.create_task(gallery.search_from_loop(unit_rows(1, 4, 0)[0], 1))
        await asyncio.to_thread(searching.wait, 10)
        ticks = 0
        for _ in range(5):  # the loop is free while the search runs
            await asyncio.sleep(0.01)
            ticks += 1
        write = asyncio.create_task(gallery.add([item(1)]))
        await asyncio.sleep(0.1)
        events.append(f"write done: {write.done()}")
        release.set()
        hits, _ = await query, await write
        events.append(f"index size {gallery.index.size}")
        await gallery.stop()
        return ticks, hits, stored

    ticks, hits, stored = asyncio.run(scenario())
    assert ticks == 5 and hits[0][0] == stored.id
    assert events == ["write done: False", "search ends", "index size 2"]


def test_overlay_is_a_png_of_the_image_size_capped_at_256():
    image = Image.new("RGB", (90, 280), "gray")
    grid = np.arange(8, dtype=np.float32).reshape(4, 2)
    png = Image.open(io.BytesIO(__import__("base64").b64decode(png_base64(overlay(image, grid)))))
    assert png.format == "PNG" and png.size == (82, 256)
    top, bottom = np.asarray(png)[5, 40], np.asarray(png)[250, 40]
    assert not np.array_equal(top, bottom)


def test_thread_plan_one_single_threaded_call_per_core_on_the_cpu_one_call_on_cuda():
    cores = cpu_cores()
    assert plan_threads(CPU, 0, 0) == (cores, 1)
    assert plan_threads(CPU, 1, 0) == (1, cores)
    assert plan_threads(CPU, 3, 2) == (3, 2)  # what the settings say wins
    assert plan_threads(CUDA, 0, 0) == (1, 0)


def test_cpu_cores_follow_a_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cpu_cores(cpu_max) == cpu_cores(tmp_path / "absent")  # no quota: the affinity
    cpu_max.write_text("50000 100000\n")  # --cpus 0.5
    assert cpu_cores(cpu_max) == 1
    cpu_max.write_text(f"{150000 * 64} 100000\n")  # a quota above the cores changes nothing
    assert cpu_cores(cpu_max) == cpu_cores(tmp_path / "absent")


def test_provider_choice_and_report(tiny_model):
    assert choose_providers("cpu") == [CPU]
    model = InferenceModel(tiny_model[1], "auto").load()
    # This machine has no GPU: whichever onnxruntime build is installed, CPU must be what runs, and said so.
    assert model.providers.active == CPU
    assert model.providers.fell_back == (model.providers.asked[0] != CPU)


def test_a_wide_call_runs_the_same_model_on_every_thread(tiny_model):
    model = InferenceModel(tiny_model[1], "cpu", instances=2, intra_op_threads=1).load()
    one_call = InferenceModel(tiny_model[1], "cpu", instances=1).load()
    assert model.wide_session is not None and one_call.wide_session is None
    images = np.random.default_rng(0).integers(0, 256, (2, *model.input_size, 3), np.uint8)
    (plain, plain_maps), (wide, wide_maps) = model.predict(images), model.predict(images, wide=True)
    assert np.array_equal(plain, wide) and np.array_equal(plain_maps.features, wide_maps.features)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_silent_cuda_fall_back_is_detected_and_reported(tiny_model, monkeypatch):
    # No GPU here: pretend this onnxruntime build offers CUDA (the one faked part); the real session then
    # runs on the CPU, as onnxruntime-gpu does on a host whose CUDA libraries are missing.
    import onnxruntime as ort

    from service.inference import CUDA, ProviderUnavailable

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    model = InferenceModel(tiny_model[1], "auto").load()
    assert model.providers.asked == [CUDA, CPU] and model.providers.active == CPU and model.providers.fell_back
    with pytest.raises(ProviderUnavailable, match="runs on CPUExecutionProvider"):
        InferenceModel(tiny_model[1], "cuda").load()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ProviderUnavailable, match="install the GPU set"):
        InferenceModel(tiny_model[1], "cuda").load()


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_tensorrt_comes_first_with_its_engine_cache_and_is_refused_where_it_cannot_run(
    tiny_model, monkeypatch, tmp_path
):
    # No GPU or TensorRT here: the build's provider list is faked (as above); the real session then runs on the
    # CPU, so asking for TensorRT explicitly refuses the start instead of silently running elsewhere.
    import onnxruntime as ort

    from service.inference import TENSORRT, ProviderUnavailable, provider_options

    assert provider_options([TENSORRT, CUDA, CPU], tmp_path / "trt", (16, 8), 32) == [
        {
            "trt_engine_cache_enable": "True",
            "trt_timing_cache_enable": "True",
            "trt_engine_cache_path": str(tmp_path / "trt"),
            "trt_timing_cache_path": str(tmp_path / "trt"),
            # one engine for every batch the service makes (1 .. REID_MAX_BATCH_SIZE), not one per batch size met
            "trt_profile_min_shapes": "images:1x16x8x3",
            "trt_profile_opt_shapes": "images:32x16x8x3",
            "trt_profile_max_shapes": "images:32x16x8x3",
        },
        {},
        {},
    ]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    assert choose_providers("tensorrt") == [TENSORRT, CUDA, CPU] and choose_providers("auto") == [CUDA, CPU]
    with pytest.raises(
        ProviderUnavailable,
        match="asked ONNX Runtime for TensorrtExecutionProvider but it runs on CPUExecutionProvider",
    ):
        InferenceModel(tiny_model[1], "tensorrt", tensorrt_cache=tmp_path / "trt").load()
    assert (tmp_path / "trt").is_dir()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(ProviderUnavailable, match="REID_EXECUTION_PROVIDER=tensorrt, but this onnxruntime offers only"):
        choose_providers("tensorrt")


def test_reads_by_id_of_more_ids_than_sqlite_takes_at_once_return_every_row(tmp_path):
    from service.store import SQL_VARIABLES

    store = GalleryStore(tmp_path / "g.sqlite3")
    stored = store.add([item(seed) for seed in range(SQL_VARIABLES + 50)])
    ids = [i.id for i in stored]
    assert len(store.get_many_with_embeddings(ids + [10**9], 4)) == len(ids) == len(store.embeddings(ids, 4))
    assert set(store.images(ids)) == set(ids)
    store.close()


def test_the_cluster_backend_needs_its_database_and_its_packages(monkeypatch):
    from service.app import create_app

    with pytest.raises(ValueError, match="REID_POSTGRES_DSN"):
        Settings(gallery_backend="cluster")
    monkeypatch.delitem(sys.modules, "service.cluster_gallery", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the [cluster] extra were not installed
    with pytest.raises(RuntimeError, match=r"needs the \[cluster\] extra \(psycopg is missing\)"):
        create_app(Settings(gallery_backend="cluster", postgres_dsn="postgresql://reid@db/reid"))
