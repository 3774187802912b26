"""Queries: one image or a track (POST /query), independent images in one batch (POST /query/batch), and
same-person verification of two images (POST /verify)."""

from dataclasses import replace
from functools import partial
from typing import List, Literal, Optional

from fastapi import FastAPI, Depends, File, Form, Request, UploadFile

from model_zoo.contract import split_branches
from service.answering import GROUP_BY_REORDERED, QueryOptions, Stopwatch, branch_scores, require_gallery
from service.errors import APIError
from service.form_fields import check_id, time_range
from service.routes.common import ERRORS, PROTECTED, TIME_FORMAT, state
from service.schemas import BatchQueryResponse, QueryResponse, VerifyResponse
from service.tracks import Aggregate, mean_embedding
from service.uploads import check_image_count, pixels_of


async def query_options(
    request: Request,
    top_k: int = Form(10, description="number of matches, 1 to REID_MAX_TOP_K"),
    camera_id: Optional[str] = Form(None, description="only matches from this camera"),
    exclude_camera_id: Optional[str] = Form(
        None, description="no matches from this camera (the re-ID protocol's same-camera rule)"
    ),
    person_id: Optional[str] = Form(None, description="only matches of this person"),
    min_score: Optional[float] = Form(None, ge=-1.0, le=1.0, description="only matches scoring at least this"),
    captured_after: Optional[str] = Form(None, description=f"only matches taken at or after this time, {TIME_FORMAT}"),
    captured_before: Optional[str] = Form(None, description=f"only matches taken before this time, {TIME_FORMAT}"),
    rerank: bool = Form(
        False,
        description="k-reciprocal re-ranking (Zhong et al. 2017) of a shortlist of "
        "REID_RERANK_SHORTLIST "
        "index hits (the same filters), the query alone with them: the matches then follow "
        "rerank_distance, not score",
    ),
    group_by: Optional[Literal["person"]] = Form(
        None,
        description="person: at most one match per person_id, its "
        "best-scoring item (items "
        "without person_id each count alone); the index search widens until "
        "top_k persons "
        "are found. Not with rerank or pair_attention (422)",
    ),
    overlays: bool = Form(
        False,
        description="with heatmaps: also draw the aggregate map over each image as a PNG (overlay_png); "
        "false (the default): grids only, a few kB a match, for a client that draws them itself (the page "
        "does, with the colour ramp of service/heatmaps.py); 8 clients got 13 heatmap queries a second with "
        "PNGs, 44 without (bench/results/heatmap_cost.json)",
    ),
    branch_overlays: bool = Form(
        False,
        description="with heatmaps: also draw each branch's map as a PNG (branch_overlays_png), and so the "
        "aggregate's too (overlays); the branch grids are there either way",
    ),
) -> QueryOptions:
    """The options every query route shares, checked before any image is read."""
    max_top_k = request.app.state.settings.max_top_k
    if not 1 <= top_k <= max_top_k:
        raise APIError(422, "invalid_request", f"top_k: must be between 1 and {max_top_k}")
    for value, name in ((camera_id, "camera_id"), (exclude_camera_id, "exclude_camera_id"), (person_id, "person_id")):
        check_id(value, name)
    after, before = time_range(captured_after, captured_before)
    if group_by and rerank:
        raise APIError(422, "invalid_request", GROUP_BY_REORDERED)
    filters = dict(
        camera_id=camera_id,
        exclude_camera_id=exclude_camera_id,
        person_id=person_id,
        min_score=min_score,
        captured_after=after,
        captured_before=before,
    )
    return QueryOptions(
        top_k,
        filters,
        rerank,
        group_by == "person",
        overlays=overlays or branch_overlays,
        branch_overlays=branch_overlays,
    )


async def query(
    request: Request,
    image: List[UploadFile] = File(
        ...,
        description="the query image; repeated, a track: several images of one person "
        "(a tracker's "
        "crops), answered as one query by `aggregate` (at most REID_MAX_IMAGES_PER_REQUEST "
        "images)",
    ),
    options: QueryOptions = Depends(query_options),
    heatmaps: bool = Form(True, description="compute RAM heatmaps for the query and each match"),
    pair_attention: bool = Form(
        False,
        description="CASN's pairwise re-ranking of a shortlist of REID_RERANK_SHORTLIST "
        "index hits "
        "(the same filters; their stored images re-embedded), by feature + Siamese attention "
        "distance: the matches "
        "then follow pair_distance and carry pair_attention. Needs a pair head (GET /model: "
        "pair_head; else 409 "
        "no_pair_head); not with rerank=true, group_by or a track (422)",
    ),
    aggregate: Aggregate = Form(
        "mean",
        description="a track's aggregation: mean (the per-branch mean of its "
        "embeddings, "
        "re-normalised, searched as one query) or best (each gallery item at the best score of "
        "any track "
        "image, which each match names in track_image; not with rerank). No effect on one "
        "image",
    ),
):
    s = state(request)
    options = replace(options, heatmaps=heatmaps, pair_attention=pair_attention)
    check_image_count(image, s.settings)
    s.answerer.check_steps(options, len(image), aggregate)
    uploads = await s.decoder.read_all(image, s.model.input_size, preview=heatmaps and options.overlays)
    await require_gallery(s.gallery)
    watch = Stopwatch()
    embedding, maps = await s.batcher.embed(pixels_of(uploads), with_maps=heatmaps or pair_attention)
    watch.lap("embed")
    vectors = embedding if aggregate == "best" else mean_embedding(embedding, s.model.contract.num_branches)[None]
    response = await s.answerer.answer(options, vectors, maps, [u.decoded.preview for u in uploads], watch)
    if len(uploads) > 1:
        response.track_size, response.aggregate = len(uploads), aggregate
    return response


async def query_batch(
    request: Request,
    images: List[UploadFile] = File(
        ..., description="the query images, each its own query (at most REID_MAX_IMAGES_PER_REQUEST)"
    ),
    options: QueryOptions = Depends(query_options),
    heatmaps: bool = Form(
        False,
        description="RAM heatmaps for each query and its first REID_MAX_HEATMAP_MATCHES "
        "matches, in upload order "
        "until the request has drawn REID_MAX_BATCH_HEATMAPS (later queries answer without; "
        "heatmap_matches says how "
        "many each drew); off by default here",
    ),
):
    """Independent queries with the same options, embedded together in one model batch; the answers in upload
    order, each what POST /query answers for that image alone. No pair_attention (it re-embeds a shortlist
    per query)."""
    s = state(request)
    options = replace(options, heatmaps=heatmaps)
    check_image_count(images, s.settings)
    uploads = await s.decoder.read_all(images, s.model.input_size, preview=heatmaps and options.overlays)
    await require_gallery(s.gallery)
    watch = Stopwatch()
    embedding, maps = await s.batcher.embed(pixels_of(uploads), with_maps=heatmaps)
    watch.lap("embed")
    # one query after the other: each one's heatmap matches are re-embedded as one batch, so the model queue
    # holds at most one query's REID_MAX_HEATMAP_MATCHES images from this request at a time
    results, heatmaps_left = [], s.settings.max_batch_heatmaps if heatmaps else 0
    for row, upload in enumerate(uploads):
        drawn = replace(
            options,
            heatmaps=heatmaps_left > 0,
            heatmap_matches=max(0, min(s.settings.max_heatmap_matches, heatmaps_left - 1)),
        )
        results.append(
            await s.answerer.answer(
                drawn,
                embedding[row : row + 1],
                None if maps is None else maps[row : row + 1],
                [upload.decoded.preview],
                Stopwatch(),
            )
        )
        heatmaps_left -= drawn.heatmaps + results[-1].heatmap_matches
    return BatchQueryResponse(results=results, gallery_size=s.gallery.size, timing_ms=watch.total())


async def verify(
    request: Request,
    image_a: UploadFile = File(..., description="one image"),
    image_b: UploadFile = File(..., description="the other image"),
):
    """Are the two images the same person? Their score, and the decision at the same-person threshold (the
    model's calibrated one, or REID_VERIFY_THRESHOLD). The gallery is not involved."""
    s = state(request)
    uploads = await s.decoder.read_all([image_a, image_b], s.model.input_size)
    watch = Stopwatch()
    embedding, _ = await s.batcher.embed(pixels_of(uploads), with_maps=False)
    watch.lap("embed")
    score = s.gallery.score(float(embedding[0] @ embedding[1]))  # as a query's: the mean cosine, clipped to [-1, 1]
    rule = s.same_person
    return VerifyResponse(
        score=score,
        branch_scores=branch_scores(embedding[1], split_branches(embedding[0], s.model.contract.num_branches)),
        same_person=rule.decide(score),
        threshold=rule.threshold,
        threshold_source=rule.source,
        calibration=rule.calibration,
        timing_ms=watch.total(),
    )


def add_routes(app: FastAPI) -> None:
    """The query routes, all behind the API key."""
    route = partial(app.add_api_route, methods=["POST"], tags=["query"], dependencies=PROTECTED, responses=ERRORS)
    route("/query", query, response_model=QueryResponse)
    route("/query/batch", query_batch, response_model=BatchQueryResponse)
    route("/verify", verify, response_model=VerifyResponse)
