"""Response bodies, as documented in the OpenAPI schema."""

from typing import ClassVar, Dict, List, Optional, Tuple

from pydantic import BaseModel, Field, model_serializer


class GalleryItem(BaseModel):
    id: int
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    metadata: Dict = Field(default_factory=dict)
    image_format: str
    width: int
    height: int
    created_at: float = Field(description="when it was enrolled, epoch seconds")
    captured_at: Optional[float] = Field(
        None, description="when the image was taken, epoch seconds, as enrolled; null: unknown"
    )


class EnrollResponse(BaseModel):
    ids: List[int]
    items: List[GalleryItem]


class GalleryPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: List[GalleryItem]


class ErasureResponse(BaseModel):
    person_id: str
    removed: int = Field(description="how many items (image, embedding, ids, metadata, index entry) were erased")
    ids: List[int] = Field(description="the ids they had")


class OmitsUnusedExtras(BaseModel):
    """Fields of opt-in features are left out of the JSON while null, so that a query that asks for none of
    them, on a model that offers none of them, answers exactly as before those features existed."""

    omitted_while_null: ClassVar[Tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_null_extras(self, serialize):
        body = serialize(self)
        return {name: value for name, value in body.items() if value is not None or name not in self.omitted_while_null}


class Heatmap(OmitsUnusedExtras):
    omitted_while_null = ("attention_grids", "attention_overlays_png")

    grid: List[List[float]] = Field(description="aggregate RAM (mean over branches), h x w; its mean is the score")
    branch_grids: List[List[List[float]]] = Field(description="per-branch RAM R^i, N x h x w")
    overlay_png: Optional[str] = Field(
        None,
        description="base64 PNG: the aggregate map over the image (min-max "
        "scaled); null when the query set overlays=false",
    )
    branch_overlays_png: List[str] = Field(
        [], description="base64 PNGs, one per branch, when the query set branch_overlays=true; else empty"
    )
    attention_grids: Optional[List[List[List[float]]]] = Field(
        None,
        description="only for a model with the optional attention_maps output (CLPD): its K maps, K x h' x w', "
        "in [0, 1], "
        "which show where each part looks; not part of the score. Absent for other models",
    )
    attention_overlays_png: Optional[List[str]] = Field(
        None,
        description="base64 PNGs, one per attention map, drawn on the maps' own [0, 1] scale (not min-max "
        "scaled); absent as above",
    )


class PairAttention(BaseModel):
    query_grid: List[List[float]] = Field(
        description="CASN's Siamese attention M_q of the query in this pair, h x w "
        "(it differs per "
        "match: the pair head picks the channels from the two images' feature "
        "difference)"
    )
    gallery_grid: List[List[float]] = Field(description="the match's Siamese attention M_g in this pair, h x w")
    query_overlay_png: Optional[str] = Field(
        None, description="base64 PNG of M_q over the query (min-max scaled), for matches with a heatmap"
    )
    gallery_overlay_png: Optional[str] = Field(
        None, description="base64 PNG of M_g over the match (min-max scaled), for matches with a heatmap"
    )


class Match(OmitsUnusedExtras):
    omitted_while_null = ("pair_distance", "pair_attention", "track_image")

    id: int
    rank: int
    score: float = Field(
        description="mean over branches of the cosine similarity, in [-1, 1]; the matches come in "
        "descending "
        "score unless the query re-ranked them (then they follow rerank_distance or pair_distance)"
    )
    branch_scores: List[float]
    rerank_distance: Optional[float] = Field(
        None,
        description="with rerank=true: the k-reciprocal re-ranked distance, "
        "lower = more "
        "alike, in [0, 1], which orders the matches; null without re-ranking",
    )
    pair_distance: Optional[float] = Field(
        None,
        description="with pair_attention=true: CASN's fused distance, "
        "min-max(feature distance) + "
        "min-max(Siamese attention distance) over the query's shortlist, in [0, 2], "
        "lower = more alike, "
        "which orders the matches; absent otherwise",
    )
    pair_attention: Optional[PairAttention] = Field(
        None, description="with pair_attention=true: the pair's attention maps behind pair_distance; absent otherwise"
    )
    track_image: Optional[int] = Field(
        None,
        description="a track queried with aggregate=best: which of its images "
        "(0-based, in upload "
        "order) gave this score; branch_scores and heatmap are that image's. Absent "
        "otherwise",
    )
    same_person: Optional[bool] = Field(
        None,
        description="score above the same-person threshold (the answer's "
        "same_person_threshold "
        "says where it was set; on cameras it was not calibrated on it is a guide, not "
        "a verdict); null "
        "when there is none (the model is not calibrated and REID_VERIFY_THRESHOLD is "
        "unset)",
    )
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    captured_at: Optional[float] = Field(None, description="when the image was taken, epoch seconds; null: unknown")
    metadata: Dict = Field(default_factory=dict)
    heatmap: Optional[Heatmap] = None


class SamePersonThreshold(BaseModel):
    threshold: float
    source: str = Field(
        description="setting (REID_VERIFY_THRESHOLD, set for these cameras) or model (calibrated on calibrated_on)"
    )
    calibrated_on: Optional[str] = Field(
        None, description="the validation set the model's threshold was chosen on; null for a setting"
    )
    target_fmr: Optional[float] = Field(
        None, description="the false-match rate it was chosen for there; its rate on other cameras differs"
    )


class VerifyResponse(BaseModel):
    score: float = Field(description="mean over branches of the cosine similarity of the two images, in [-1, 1]")
    branch_scores: List[float]
    same_person: Optional[bool] = Field(description="score > threshold; null when there is no threshold")
    threshold: Optional[float] = Field(
        description="the decision threshold; null: the model is not calibrated and REID_VERIFY_THRESHOLD is unset"
    )
    threshold_source: Optional[str] = Field(
        description="setting (REID_VERIFY_THRESHOLD) or model (its calibration); null without a threshold"
    )
    calibration: Dict = Field(
        description="the model's calibration record (reid.verification, without its ROC, which "
        "GET /model has): "
        "target_fmr, the fmr and tmr reached on calibrated_on, and held_out sets' fmr and tmr at "
        "that threshold; "
        "{} when the model is not calibrated"
    )
    timing_ms: Dict[str, float]


class QueryResponse(OmitsUnusedExtras):
    omitted_while_null = ("track_size", "aggregate", "track_heatmaps")

    matches: List[Match]
    query_heatmap: Optional[Heatmap] = Field(
        None, description="the query's own map R_q^q; null for a track (see track_heatmaps)"
    )
    track_size: Optional[int] = Field(
        None, description="a query by a track (several images): how many images; absent for one image"
    )
    aggregate: Optional[str] = Field(
        None, description="a query by a track: how its images were aggregated, mean or best; absent for one image"
    )
    track_heatmaps: Optional[List[Heatmap]] = Field(
        None,
        description="a query by a track, with heatmaps: each track image's map, in upload order, for the query "
        "features its matches "
        "were scored with (mean: the aggregate's, so its grid averages to the image's cosine with the aggregate; best: "
        "the image's own, R_q^q)",
    )
    reranked: bool = Field(
        False,
        description="true when the matches were re-ranked: their order follows "
        "rerank_distance (rerank=true) "
        "or pair_distance (pair_attention=true), not score, "
        "and score (still the mean cosine, the heatmap grid's mean) need not decrease down the list",
    )
    heatmap_matches: int = Field(
        0,
        description="how many matches carry a heatmap: the first ones, at most "
        "REID_MAX_HEATMAP_MATCHES "
        "(0 with heatmaps=false)",
    )
    same_person_threshold: Optional[SamePersonThreshold] = Field(
        None,
        description="where each match's same_person comes from; null when there is no threshold (same_person is null)",
    )
    gallery_size: int
    timing_ms: Dict[str, float]


class BatchQueryResponse(BaseModel):
    results: List[QueryResponse] = Field(
        description="one answer per image, in upload order, each what POST /query "
        "answers for that image "
        "with the same options (its timing_ms without the shared embedding)"
    )
    gallery_size: int
    timing_ms: Dict[str, float] = Field(description="embed: the one model batch of every image; total")


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
