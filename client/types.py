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
    track_image: Optional[int] = None  # a best-of track: which of its images (0-based) gave the score
    same_person: Optional[bool] = None  # score above the same-person threshold; None: the server has none
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Verification:
    score: float  # mean over branches of the cosine similarity of the two images
    branch_scores: List[float]
    same_person: Optional[bool]  # None: no threshold (model not calibrated, REID_VERIFY_THRESHOLD unset)
    threshold: Optional[float]
    threshold_source: Optional[str]  # "setting" or "model"
    calibration: Dict[str, Any]
    timing_ms: Dict[str, float]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class QueryResult:
    matches: List[Match]
    gallery_size: int
    timing_ms: Dict[str, float]
    query_heatmap: Optional[Dict[str, Any]] = None
    reranked: bool = False
    track_size: Optional[int] = None  # a query by a track: its images; None for one image
    aggregate: Optional[str] = None  # a query by a track: mean or best
    track_heatmaps: Optional[List[Dict[str, Any]]] = None  # a query by a track, with heatmaps: each image's map
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "QueryResult":
        return cls(
            [from_json(Match, m) for m in data["matches"]],
            data["gallery_size"],
            data["timing_ms"],
            data.get("query_heatmap"),
            data.get("reranked", False),
            data.get("track_size"),
            data.get("aggregate"),
            data.get("track_heatmaps"),
            raw=data,
        )


@dataclass(frozen=True)
class BatchResult:
    results: List[QueryResult]  # one per query image, in the order sent
    gallery_size: int
    timing_ms: Dict[str, float]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "BatchResult":
        return cls(
            [QueryResult.from_json(r) for r in data["results"]], data["gallery_size"], data["timing_ms"], raw=data
        )
