"""Logs that a client cannot flood: each message (its template, per logger and level) is written at most once
per ``REPEAT_WINDOW_S``; the next one written says how many were held back. Every unparsable request made
uvicorn log a WARNING, so a client could fill a disk or bury a real error with one line per bad request."""

import logging
import time
from collections import Counter
from typing import Dict, Tuple

REPEAT_WINDOW_S = 10.0
MAX_TRACKED = (
    1000  # message templates remembered; past it they are forgotten (a message built per call is not a template)
)


class RepeatThrottle(logging.Filter):
    def __init__(self, window_s: float = REPEAT_WINDOW_S, clock=time.monotonic):
        super().__init__()
        self.window_s, self.clock = window_s, clock
        self._last: Dict[Tuple[str, int, str], float] = {}
        self._held: Counter = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.levelno, str(record.msg)), self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._held[key] += 1
            return False
        if len(self._last) >= MAX_TRACKED:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this held back)"
        return True


def throttle_repeats(*logger_names: str) -> None:
    """Throttle what the handlers of these loggers (the root logger: "") write."""
    throttle = RepeatThrottle()
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(throttle)
