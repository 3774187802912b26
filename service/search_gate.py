"""Searches in worker threads, index changes on the event loop, never both at once.

An embedded gallery's exact scan of 100k items takes about 120 ms, and on the event loop it held up every
other request for that long. Searches now run in worker threads (FAISS releases the GIL, so they also run
side by side), while the index and its labels are still changed only on the event loop, between two writes:
a change waits, without blocking the loop, for the searches in flight to end, and searches that start
meanwhile wait, in their threads, for the change to end. Writer first, so a stream of searches cannot hold
writes off.
"""

import asyncio
import threading
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator


class SearchGate:
    def __init__(self):
        self._state = threading.Condition()
        self._searches = 0
        self._changing = False
        self._changes = asyncio.Lock()  # one change at a time
        self._idle = asyncio.Event()  # set when a change's wait for the searches in flight is over
        self._loop = asyncio.get_running_loop()

    @contextmanager
    def searching(self) -> Iterator[None]:
        """In a worker thread, around one search."""
        with self._state:
            self._state.wait_for(lambda: not self._changing)
            self._searches += 1
        try:
            yield
        finally:
            with self._state:
                self._searches -= 1
                if self._changing and not self._searches:
                    self._loop.call_soon_threadsafe(self._idle.set)

    @asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """On the event loop, around a change of the index or its labels."""
        async with self._changes:
            with self._state:
                self._changing = True
                self._idle.clear()
                busy = self._searches > 0
            try:
                if busy:
                    await self._idle.wait()
                yield
            finally:
                with self._state:
                    self._changing = False
                    self._state.notify_all()
