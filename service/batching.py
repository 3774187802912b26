"""Dynamic micro-batching: images from concurrent requests are embedded together.

A request's images wait in a queue; the worker takes the first, then keeps collecting until the batch holds
``max_batch_size`` images or ``max_wait`` seconds have passed, runs the model once in its own thread, and hands
each request its rows. Requests larger than a batch are split.
"""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from service.inference import InferenceModel


@dataclass
class _Job:
    images: np.ndarray
    with_maps: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, model: InferenceModel, max_batch_size: int, max_wait_s: float, observe=None):
        self.model, self.max_batch_size, self.max_wait_s = model, max_batch_size, max_wait_s
        self.observe = observe  # callback(batch_size, [queue wait in seconds of each request]) for metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.queue: Optional[asyncio.Queue] = None
        self.worker: Optional[asyncio.Task] = None
        self._carry: Optional[_Job] = None  # a job that did not fit the last batch: it starts the next one

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def embed(self, images: np.ndarray, with_maps: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Embed uint8 images [B, H, W, 3]; returns (embedding, feature maps or None)."""
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(images), self.max_batch_size):
            job = _Job(images[start : start + self.max_batch_size], with_maps, loop.create_future())
            await self.queue.put(job)
            jobs.append(job)
        results = await asyncio.gather(*(job.future for job in jobs))
        embedding = np.concatenate([r[0] for r in results])
        maps = np.concatenate([r[1] for r in results]) if with_maps else None
        return embedding, maps

    async def _collect(self) -> List[_Job]:
        jobs = [self._carry or await self.queue.get()]
        self._carry = None
        count = len(jobs[0].images)
        deadline = time.perf_counter() + self.max_wait_s
        while count < self.max_batch_size:
            if self.queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            if count + len(job.images) > self.max_batch_size:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            started = time.perf_counter()
            with_maps = any(job.with_maps for job in jobs)
            batch = np.concatenate([job.images for job in jobs])
            try:
                embedding, maps = await loop.run_in_executor(self.executor, self.model.predict, batch, with_maps)
            except Exception as exc:  # a model failure fails the requests in this batch, not the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            if self.observe:
                self.observe(len(batch), [started - job.enqueued for job in jobs])
            offset = 0
            for job in jobs:
                rows = slice(offset, offset + len(job.images))
                offset = rows.stop
                if not job.future.done():
                    job.future.set_result((embedding[rows], maps[rows] if job.with_maps else None))
