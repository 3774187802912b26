"""Dynamic micro-batching: images from concurrent requests are embedded together.

Requests put their images on a thread-safe queue. The model runs in its own threads (``instances`` of them,
see ``service.inference.plan_threads``), which also form the batches: one at a time, a thread takes the first
waiting job and keeps collecting until the batch holds ``max_batch_size`` images, or (with several threads)
its share of the waiting images, or the first job has waited ``max_wait`` seconds; then it runs the model,
hands the rows back to the event loop, and comes back for the next batch. A batch that finds no other call
running and nothing waiting (a lone query) runs on every thread: ``InferenceModel.predict(wide=True)``. The
model never waits for the event loop to get round to starting it, which under load is what keeps it busy. A
request is split into parts no larger than a batch, and into one part per model thread.
Past ``max_queued_images`` waiting images a request is refused at once (``Overloaded``) rather than queued
behind work its client may have given up on.
"""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from service.inference import ImageMaps, InferenceModel

_STOP = object()


class Overloaded(RuntimeError):
    """Too many images are already waiting for the model."""


@dataclass
class _Job:
    images: np.ndarray
    with_maps: bool
    future: asyncio.Future
    request: object  # the parts of one request share it, and go to different model calls
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        model: InferenceModel,
        max_batch_size: int,
        max_wait_s: float,
        instances: int = 1,
        max_queued_images: int = 1 << 30,
        observe=None,
    ):
        self.model, self.max_batch_size, self.max_wait_s, self.instances = model, max_batch_size, max_wait_s, instances
        self.max_queued_images = max_queued_images
        self._queued_images = 0  # put on the queue and not yet in a batch
        self._in_model = 0  # model calls running
        self._counting = threading.Lock()
        # observe(batch size, [queue wait of each request], model seconds), called on the event loop
        self.observe = observe
        self._queue: "queue.Queue" = queue.Queue()
        self._collecting = threading.Lock()  # one thread forms a batch at a time; it also guards _carry
        self._carry = None  # a job that did not fit the last batch (it starts the next one), or _STOP
        self._threads: List[threading.Thread] = []

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._run, name=f"model-{i}", daemon=True) for i in range(self.instances)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        """Finish the jobs already queued, then stop the model threads."""
        if self._threads:
            self._queue.put(_STOP)
            await asyncio.to_thread(lambda: [thread.join() for thread in self._threads])

    def queued_images(self) -> int:
        """Images put on the queue and not yet in a batch (a gauge reads it at each scrape)."""
        return self._queued_images

    async def embed(self, images: np.ndarray, with_maps: bool = False) -> Tuple[np.ndarray, Optional[ImageMaps]]:
        """Embed uint8 images [B, H, W, 3]; returns (embedding, maps or None)."""
        with self._counting:
            if self._queued_images + len(images) > self.max_queued_images:
                raise Overloaded(
                    f"{self._queued_images} images are waiting for the model already "
                    f"(REID_MAX_QUEUED_IMAGES={self.max_queued_images})"
                )
            self._queued_images += len(images)
        # Split over the instances too, so that a lone request (a query's matches re-embedded for heatmaps)
        # uses every model thread; under load the collector joins the parts with other requests' again.
        size = min(self.max_batch_size, -(-len(images) // self.instances))
        request = object()
        jobs = [
            _Job(images[start : start + size], with_maps, self._loop.create_future(), request)
            for start in range(0, len(images), size)
        ]
        for job in jobs:
            self._queue.put(job)
        results = await asyncio.gather(*(job.future for job in jobs))
        embedding = np.concatenate([r[0] for r in results])
        maps = ImageMaps.concatenate([r[1] for r in results]) if with_maps else None
        return embedding, maps

    def _collect(self) -> Optional[List[_Job]]:
        """The next batch's jobs, or None once stopped (model thread, holding ``_collecting``)."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            self._carry = _STOP  # left for the other model threads
            return None
        jobs, count = [first], len(first.images)
        # The wait counts from the first job's arrival: jobs that queued while the model was busy have waited
        # already, so they go at once.
        deadline = first.enqueued + self.max_wait_s
        while count < self.max_batch_size and not self._has_its_share(count):
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if (
                job is _STOP
                or count + len(job.images) > self.max_batch_size
                or any(job.request is j.request for j in jobs)
            ):
                self._carry = job
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    def _has_its_share(self, count: int) -> bool:
        """With several model threads, a batch takes its share of the waiting images and goes: the rest are left
        for the other threads, busy or not. Taking them all left the others idle when they finished, while this
        call's clients were still away sending their next request: 4 clients kept the model busy 43% of the
        time (bench/results/service_enrol_before.json), all of it since (service_enrol.json). One thread waits
        for company up to max_wait instead."""
        return self.instances > 1 and count * self.instances >= self._queued_images

    def _run(self) -> None:
        while True:
            with self._collecting:
                jobs = self._collect()
            if jobs is None:
                return
            with self._counting:
                self._queued_images -= sum(len(job.images) for job in jobs)
                alone = self._in_model == 0 and self._queued_images == 0  # a lone query, say: use every thread
                self._in_model += 1
            started = time.perf_counter()
            batch = np.concatenate([job.images for job in jobs])
            try:
                result, error = self.model.predict(batch, any(job.with_maps for job in jobs), wide=alone), None
            except Exception as exc:  # a model failure fails the requests in this batch, not the batcher
                result, error = None, exc
            with self._counting:
                self._in_model -= 1
            self._loop.call_soon_threadsafe(self._deliver, jobs, result, error, started, time.perf_counter() - started)

    def _deliver(
        self, jobs: List[_Job], result, error: Optional[Exception], started: float, model_seconds: float
    ) -> None:
        if error is None and self.observe:
            self.observe(sum(len(job.images) for job in jobs), [started - job.enqueued for job in jobs], model_seconds)
        offset = 0
        for job in jobs:
            rows = slice(offset, offset + len(job.images))
            offset = rows.stop
            if job.future.done():  # the request was cancelled
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                embedding, maps = result
                job.future.set_result((embedding[rows], maps[rows] if job.with_maps else None))
