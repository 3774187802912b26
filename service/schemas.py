"""Response bodies, as documented in the OpenAPI schema."""
from typing import Dict, List, Optional

from pydantic import BaseModel, Field


class GalleryItem(BaseModel):
    id: int
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    metadata: Dict = Field(default_factory=dict)
    image_format: str
    width: int
    height: int
    created_at: float


class EnrollResponse(BaseModel):
    ids: List[int]
    items: List[GalleryItem]


class GalleryPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: List[GalleryItem]


class Heatmap(BaseModel):
    grid: List[List[float]] = Field(description="aggregate RAM (mean over branches), h x w; its mean is the score")
    branch_grids: List[List[List[float]]] = Field(description="per-branch RAM R^i, N x h x w")
    overlay_png: str = Field(description="base64 PNG: the aggregate map over the image (min-max scaled)")
    branch_overlays_png: List[str] = Field(description="base64 PNGs, one per branch")


class Match(BaseModel):
    id: int
    rank: int
    score: float = Field(description="mean over branches of the cosine similarity, in [-1, 1]; the matches come in descending "
                         "score unless the query re-ranked them (then they follow rerank_distance)")
    branch_scores: List[float]
    rerank_distance: Optional[float] = Field(None, description="with rerank=true: the k-reciprocal re-ranked distance, lower = more "
                                             "alike, in [0, 1], which orders the matches; null without re-ranking")
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    metadata: Dict = Field(default_factory=dict)
    heatmap: Optional[Heatmap] = None


class QueryResponse(BaseModel):
    matches: List[Match]
    query_heatmap: Optional[Heatmap] = Field(None, description="the query's own map R_q^q")
    reranked: bool = Field(False, description="true when the matches were re-ranked: their order follows rerank_distance, not score, "
                           "and score (still the mean cosine, the heatmap grid's mean) need not decrease down the list")
    heatmap_matches: int = Field(0, description="how many matches carry a heatmap: the first ones, at most REID_MAX_HEATMAP_MATCHES "
                                 "(0 with heatmaps=false)")
    gallery_size: int
    timing_ms: Dict[str, float]


class ProviderInfo(BaseModel):
    requested: str
    asked: List[str]
    active: str = Field(description="the execution provider ONNX Runtime really uses")
    fell_back: bool
    instances: int = Field(description="model calls that run at once")
    intra_op_threads: int = Field(description="ONNX Runtime threads per model call (0: its default)")


class ReadyResponse(BaseModel):
    ready: bool
    provider: ProviderInfo
    index: Dict[str, object]
    gallery_size: int
    model_fingerprint: str
