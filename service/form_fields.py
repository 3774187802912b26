"""The API's form fields checked into its documented 422 answers: ids, capture times and their ranges,
metadata, and fields given once for all images or once per image. The rules themselves live in
``service.validation``; this module turns their refusals into ``APIError``."""

import time
from typing import List, Optional, Tuple

from service.errors import APIError
from service.settings import Settings
from service.validation import InvalidValue, check_canonical_label, check_label, parse_time
from service.validation import parse_metadata as parse_metadata_text

SECONDS_PER_DAY = 86400
MAX_CLOCK_AHEAD_S = SECONDS_PER_DAY  # a camera clock may run ahead, but a capture time later than this is a mistake


def per_image(values: Optional[List[str]], count: int, name: str) -> List[Optional[str]]:
    """A form field given once (for every image) or once per image."""
    if not values:
        return [None] * count
    if len(values) not in (1, count):
        raise APIError(
            422, "invalid_request", f"{name}: give it once, or once per image ({count}), not {len(values)} times"
        )
    return values * count if len(values) == 1 else list(values)


def check_id(value: Optional[str], name: str) -> Optional[str]:
    """An id to write or search by, in its canonical spelling (service.validation.check_canonical_label)."""
    return _as_request_error(check_canonical_label, value, name)


def check_stored_id(value: Optional[str], name: str) -> Optional[str]:
    """An id to erase: any spelling an earlier version may have stored (service.validation.check_label)."""
    return _as_request_error(check_label, value, name)


def _as_request_error(check, value: Optional[str], name: str) -> Optional[str]:
    try:
        return check(value, name)
    except InvalidValue as exc:
        raise APIError(422, "invalid_request", str(exc)) from None


def check_time(text: Optional[str], name: str) -> Optional[float]:
    try:
        return parse_time(text, name)
    except InvalidValue as exc:
        raise APIError(422, "invalid_request", str(exc)) from None


def check_captured_at(text: Optional[str], settings: Settings) -> Optional[float]:
    """A capture time to store: not in the future, and not already past REID_RETENTION_DAYS (it would only
    be stored to be erased)."""
    captured = check_time(text, "captured_at")
    if captured is None:
        return None
    now = time.time()
    if captured > now + MAX_CLOCK_AHEAD_S:
        raise APIError(422, "invalid_request", f"captured_at: {text} is more than a day in the future")
    if settings.retention_days and captured < now - settings.retention_days * SECONDS_PER_DAY:
        raise APIError(
            422, "invalid_request", f"captured_at: {text} is older than REID_RETENTION_DAYS={settings.retention_days:g}"
        )
    return captured


def time_range(after: Optional[str], before: Optional[str]) -> Tuple[Optional[float], Optional[float]]:
    """The captured_after / captured_before filters as epoch seconds: captured_after <= captured_at <
    captured_before."""
    start, end = check_time(after, "captured_after"), check_time(before, "captured_before")
    if start is not None and end is not None and start >= end:
        raise APIError(422, "invalid_request", "captured_after must be earlier than captured_before")
    return start, end


def parse_metadata(text: Optional[str]) -> dict:
    """Checked in full before anything is written: see service.validation."""
    try:
        return parse_metadata_text(text)
    except InvalidValue as exc:
        raise APIError(422, "invalid_metadata", f"metadata: {exc}") from None
