"""What may be written to the gallery, checked before any write, and what is read back in a form that always
serialises: a stored row must never make a read fail.

Metadata is strict JSON that round-trips: an object, at most ``MAX_METADATA_DEPTH`` levels deep, no lone
surrogate in any key or string (UTF-8 cannot carry one, so the answer could not be written), no NaN, Infinity
or number too large for a double (JSON has none; they would come back as null). Ids are 1 to ``MAX_ID_LENGTH``
characters of printable text: no control characters, no surrogates; written and searched in their canonical
spelling only (``check_canonical_label``). Times are ISO 8601 with a time zone or
epoch seconds, from 1970 to 9999; a naive time would be read in some unknown zone, so it is refused.
"""

import json
import math
import re
import unicodedata
from collections import Counter
from datetime import datetime
from typing import Any, Optional

MAX_ID_LENGTH = 128
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32
MAX_ITEM_ID = 2**63 - 1  # SQLite's INTEGER: a larger id can name no item
ITEM_ID_PATTERN = r"^[1-9][0-9]{0,18}$"  # plain decimal digits: no sign, no "_", no leading zero, no spaces
UNREADABLE_KEY = "unreadable_stored_metadata"
# YYYY-MM-DDTHH:MM[:SS[.fraction]] and a zone (Z or +HH:MM): the shape checked before datetime reads the values,
# since datetime.fromisoformat alone takes any separator and a zone-less time
ISO_TIME_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
EPOCH_PATTERN = r"[0-9]{1,12}(\.[0-9]{1,9})?"  # plain decimal seconds: no sign, exponent, "_", nan or inf
LAST_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, datetime's last second


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
    """person_id / camera_id as any version of the service may have stored it: printable text of 1 to
    MAX_ID_LENGTH characters, or absent. What erasure accepts, so that every stored spelling can be erased."""
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_ID_LENGTH:
        raise InvalidValue(f"{name}: must be 1 to {MAX_ID_LENGTH} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise InvalidValue(f"{name}: control characters and lone surrogates are not allowed")
    return value


def check_canonical_label(value: Optional[str], name: str) -> Optional[str]:
    """An id to write or search by: ``check_label``, in its one canonical spelling. Canonical: Unicode NFKC
    (fullwidth letters are their ASCII letters, ligatures their letters), no space at either end, no invisible
    format character (zero-width space, joiners, direction marks). Another spelling is refused, naming the
    canonical one, so an id that looks like another is never a second person that an erasure would miss. Ids
    are case-sensitive: ``Bob`` and ``bob`` are two ids."""
    if check_label(value, name) is None:
        return None
    if any(unicodedata.category(ch) == "Cf" for ch in value):
        raise InvalidValue(
            f"{name}: invisible format characters (zero-width spaces, joiners, direction marks) are not allowed"
        )
    if "\ufffd" in value:  # what a URL's or form's bytes that were not UTF-8 decode to
        raise InvalidValue(f"{name}: U+FFFD (a replacement for bytes that were not UTF-8 text) is not allowed")
    canonical = unicodedata.normalize("NFKC", value).strip()
    if canonical != value:
        raise InvalidValue(
            f"{name}: {value!r} is not in its canonical spelling {canonical!r} (Unicode NFKC, no space at either end)"
        )
    return value


def parse_time(text: Optional[str], name: str) -> Optional[float]:
    """A time form field as epoch seconds (None when absent); InvalidValue unless it is ISO 8601 with a time
    zone or epoch seconds, between 1970 and 9999."""
    if text is None or text == "":
        return None
    if re.fullmatch(EPOCH_PATTERN, text):
        seconds = float(text)
    elif re.fullmatch(ISO_TIME_PATTERN, text):
        try:
            seconds = datetime.fromisoformat(text).timestamp()
        except ValueError as exc:  # month 13, February 30, hour 25, offset past 24 h
            raise InvalidValue(f"{name}: {exc}") from None
    else:
        raise InvalidValue(
            f"{name}: {text[:40]!r} is neither ISO 8601 with a time zone (2024-06-01T12:00:00Z, "
            "2024-06-01T14:00:00+02:00) nor epoch seconds (1717243200)"
        )
    if not 0 <= seconds <= LAST_EPOCH:
        raise InvalidValue(f"{name}: must be between 1970 and 9999")
    return seconds


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
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
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


def _unique_keys(pairs: list) -> dict:
    """An object whose keys are all different: JSON allows a repeated key and a parser keeps the last value,
    so ``{"a": 1, "a": 2}`` would be stored as something other than what was sent, silently."""
    value = dict(pairs)
    if len(value) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise InvalidValue(f"a key appears more than once in one object: {', '.join(map(repr, repeated[:5]))}")
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
