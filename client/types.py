"""Typed views of the service's answers. Unknown fields are kept in ``raw`` and otherwise ignored, so a
client keeps working against a newer server."""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Type, TypeVar

T = TypeVar("T")


def from_json(cls: Type[T], data: Dict[str, Any]) -> T:
    """``cls`` from the fields of ``data`` it declares; the whole of ``data`` goes into ``raw``."""
    known = {f.name for f in fields(cls)} - {"raw"}
    return cls(**{k: v for k, v in data.items() if k in known}, raw=data)


class ReIDError(Exception):
    """An error answer: its HTTP status and the documented ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class EnrolledItem:
    id: int
    image_format: str
    width: int
    height: int
    created_at: float
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    captured_at: Optional[float] = None  # epoch seconds; None: unknown
    metadata: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class GalleryPage:
    total: int
    limit: int
    offset: int
    items: List[EnrolledItem]

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "GalleryPage":
        return cls(data["total"], data["limit"], data["offset"], [from_json(EnrolledItem, i) for i in data["items"]])


@dataclass(frozen=True)
class Match:
    id: int
    rank: int
    score: float
    branch_scores: List[float]
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    captured_at: Optional[float] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    heatmap: Optional[Dict[str, Any]] = None  # grid, branch_grids, overlay_png (base64), ...
    rerank_distance: Optional[float] = None
    pair_distance: Optional[float] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class QueryResult:
    matches: List[Match]
    gallery_size: int
    timing_ms: Dict[str, float]
    query_heatmap: Optional[Dict[str, Any]] = None
    reranked: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "QueryResult":
        return cls([from_json(Match, m) for m in data["matches"]], data["gallery_size"], data["timing_ms"],
                   data.get("query_heatmap"), data.get("reranked", False), raw=data)
