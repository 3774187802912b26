"""What may be written to the gallery, checked before any write, and what is read back in a form that always
serialises: a stored row must never make a read fail.

Metadata is strict JSON that round-trips: an object, at most ``MAX_METADATA_DEPTH`` levels deep, no lone
surrogate in any key or string (UTF-8 cannot carry one, so the answer could not be written), no NaN, Infinity
or number too large for a double (JSON has none; they would come back as null). Ids are 1 to ``MAX_ID_LENGTH``
characters of printable text: no control characters, no surrogates.
"""
import json
import math
import re
import unicodedata
from typing import Any, Optional

MAX_ID_LENGTH = 128
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32
MAX_ITEM_ID = 2**63 - 1  # SQLite's INTEGER: a larger id can name no item
ITEM_ID_PATTERN = r"^[1-9][0-9]{0,18}$"  # plain decimal digits: no sign, no "_", no leading zero, no spaces
UNREADABLE_KEY = "unreadable_stored_metadata"


class InvalidValue(ValueError):
    """A value that must not be written; the message says why."""


def check_item_id(text: str) -> str:
    """Path ids as plain decimal digits only (int() alone would take "+1", "1_0" and " 1")."""
    if not re.fullmatch(ITEM_ID_PATTERN, text):
        raise InvalidValue("must be a positive integer written in decimal digits")
    return text


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def check_label(value: Optional[str], name: str) -> Optional[str]:
    """person_id / camera_id: printable text of 1 to MAX_ID_LENGTH characters, or absent."""
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_ID_LENGTH:
        raise InvalidValue(f"{name}: must be 1 to {MAX_ID_LENGTH} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise InvalidValue(f"{name}: control characters and lone surrogates are not allowed")
    return value


def _refuse_constant(name: str):
    raise InvalidValue(f"{name} is not JSON: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidValue(f"{text[:20]} is too large for a number (a double): numbers must be finite")
    return value


def check_writable(value: Any, depth: int = 1) -> None:
    """Raise InvalidValue unless ``value`` (parsed JSON) serialises back to the same strict JSON."""
    if depth > MAX_METADATA_DEPTH:
        raise InvalidValue(f"nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, str) and has_surrogate(value):
        raise InvalidValue("contains a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot carry")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValue("numbers must be finite")
    if isinstance(value, dict):
        for key, item in value.items():
            check_writable(key, depth)
            check_writable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_writable(item, depth + 1)


def parse_metadata(text: Optional[str]) -> dict:
    """A metadata form field as the dict to store; InvalidValue when it could not be written back as sent."""
    if text is None or text == "":
        return {}
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise InvalidValue(f"more than {MAX_METADATA_BYTES} bytes")
    return strict_json_object(text)


def strict_json_object(text: str) -> dict:
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:  # far deeper than the limit: the parser gave up before check_writable could say so
        raise InvalidValue(f"nested deeper than {MAX_METADATA_DEPTH} levels") from None
    except InvalidValue:
        raise
    except ValueError as exc:
        raise InvalidValue(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidValue("must be a JSON object")
    check_writable(value)
    return value


def dump_metadata(value: dict) -> str:
    """The stored text: strict JSON (allow_nan=False is the last guard against a non-finite number)."""
    return json.dumps(value, allow_nan=False)


def read_metadata(text: str) -> dict:
    """Stored metadata as answered. A row written before these checks (or by another tool) that is not
    strict, writable JSON comes back as its stored text under UNREADABLE_KEY: nothing is lost or guessed,
    the read still succeeds, and the client can see which item to fix or delete."""
    try:
        return strict_json_object(text)  # no size check: the stored text escapes non-ASCII, so it is longer
    except InvalidValue:
        return {UNREADABLE_KEY: text}
