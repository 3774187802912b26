"""A query's answer from its embedded images: the index search (one vector, a track's mean, or a best-of
track's images merged), the optional re-ranking steps (k-reciprocal, CASN's pairwise stage), the matches and
their RAM heatmaps, each match explained with the query features it was scored with."""

import asyncio
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from model_zoo.contract import split_branches
from model_zoo.pair_attention import PairHead
from model_zoo.ram import ranking_activation_maps
from model_zoo.rerank import rerank_shortlist
from service.errors import APIError
from service.gallery import GalleryBase
from service.heatmaps import overlay, png_base64
from service.inference import ImageMaps, InferenceModel
from service.match_maps import MatchMaps
from service.metrics import ServiceMetrics
from service.pair_ranking import rank_shortlist
from service.schemas import Heatmap, Match, PairAttention, QueryResponse
from service.settings import Settings
from service.tracks import Hit, merge_best
from service.verification import SamePersonRule

GROUP_BY_REORDERED = (
    "group_by keeps each person's best match in the index's order; rerank and pair_attention put a "
    "fixed shortlist "
    "in their own order: choose one"
)


class Stopwatch:
    """An answer's timing_ms: the milliseconds of each step, then the total."""

    def __init__(self):
        self.started, self.timing = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        self.timing[name] = (time.perf_counter() - self.started) * 1000 - sum(self.timing.values())

    def total(self) -> Dict[str, float]:
        self.timing["total"] = (time.perf_counter() - self.started) * 1000
        return self.timing


@dataclass(frozen=True)
class QueryOptions:
    """What the queries of one request share."""

    top_k: int
    filters: Dict[str, object]  # Gallery.search's filter arguments
    rerank: bool
    group_by_person: bool
    heatmaps: bool = False
    pair_attention: bool = False
    overlays: bool = True  # False: grids only, no PNG (the client draws them)
    branch_overlays: bool = False
    heatmap_matches: Optional[int] = None  # matches drawn with heatmaps; None: REID_MAX_HEATMAP_MATCHES

    @property
    def reorders(self) -> bool:
        """A re-ranking step puts a shortlist in its own order."""
        return self.rerank or self.pair_attention


async def require_gallery(gallery: GalleryBase) -> None:
    if await gallery.current_size() == 0:
        raise APIError(409, "gallery_empty", "the gallery is empty: enrol images with POST /gallery first")


async def search_index(
    gallery: GalleryBase, vectors: np.ndarray, k: int, options: QueryOptions
) -> Tuple[List[Hit], Dict[int, int]]:
    """A query's index hits: its one vector's, or a best-of track's, each image searched and the hits merged at
    their best score; and, for the latter, which track image gave each hit its score ({} otherwise)."""
    searches = [
        await gallery.search_from_loop(vector, k, group_by_person=options.group_by_person, **options.filters)
        for vector in vectors
    ]
    if len(searches) == 1:
        return searches[0], {}
    return merge_best(searches, k, gallery.person_group if options.group_by_person else None)


def branch_scores(vector: np.ndarray, query_features: np.ndarray) -> List[float]:
    """Each branch's cosine between an embedding [N*D] and query features [N, D]."""
    return (split_branches(vector, len(query_features)) * query_features).sum(axis=1).tolist()


def match_body(rank: int, score: float, item, vector: np.ndarray, query_features: np.ndarray, **ranking) -> Match:
    """``ranking``: the fields a re-ranking step adds (rerank_distance, or pair_distance and pair_attention)."""
    return Match(
        id=item.id,
        rank=rank,
        score=score,
        branch_scores=branch_scores(vector, query_features),
        **ranking,
        person_id=item.person_id,
        camera_id=item.camera_id,
        captured_at=item.captured_at,
        metadata=item.metadata,
    )


def rerank_hits(
    embedding: np.ndarray, hits: List[Tuple[int, float]], found: dict, top_k: int, settings: Settings
) -> Tuple[List[Tuple[int, float]], List[dict]]:
    """The shortlist ``hits`` re-ranked with the query alone (model_zoo.rerank): the first ``top_k`` in the
    new order, and their Match fields (rerank_distance). ``found`` holds each hit's stored embedding."""
    vectors = np.stack([found[i][1] for i, _ in hits]) if hits else np.zeros((0, len(embedding)), np.float32)
    distances, order = rerank_shortlist(
        embedding, vectors, settings.rerank_k1, settings.rerank_k2, settings.rerank_lambda
    )
    order = order[:top_k]
    return [hits[j] for j in order], [{"rerank_distance": float(distances[j])} for j in order]


GRID_DECIMALS = 6  # a grid's mean stays its score to 5e-7; a cell is 8 characters of JSON, not float32's 20


def grid_json(grid: np.ndarray) -> list:
    return np.round(grid.astype(np.float64), GRID_DECIMALS).tolist()


def make_heatmap(
    query_features: np.ndarray, maps: ImageMaps, image, overlays: bool = True, branch_overlays: bool = False
) -> Heatmap:
    """RAM of one image (``maps`` indexed to it), and the model's own attention maps when it exports them.
    PNGs are drawn on ``image`` only with ``overlays`` (the aggregate's; each branch's too with
    ``branch_overlays``): they were most of a heatmap query's CPU and bytes (bench/results/heatmap_cost.json),
    and the grids are all a client needs to draw them itself, as the page does."""
    ram = ranking_activation_maps(query_features, maps.features)
    heatmap = Heatmap(grid=grid_json(ram.aggregate), branch_grids=grid_json(ram.per_branch))
    if overlays:
        heatmap.overlay_png = png_base64(overlay(image, ram.aggregate))
        heatmap.branch_overlays_png = (
            [png_base64(overlay(image, grid)) for grid in ram.per_branch] if branch_overlays else []
        )
    if maps.attention is not None:
        heatmap.attention_grids = grid_json(maps.attention)
        if overlays:
            heatmap.attention_overlays_png = [
                png_base64(overlay(image, grid, unit_scale=True)) for grid in maps.attention
            ]
    return heatmap


def draw_pair_attention(pair: PairAttention, query_image, match_image) -> None:
    pair.query_overlay_png = png_base64(overlay(query_image, np.array(pair.query_grid)))
    pair.gallery_overlay_png = png_base64(overlay(match_image, np.array(pair.gallery_grid)))


def match_heatmap(
    query_features: np.ndarray, maps: ImageMaps, image, match: Match, query_image, options: "QueryOptions"
) -> Heatmap:
    """One match's drawings, in one worker thread: its RAM and, after a pair_attention query, its pair's maps."""
    if match.pair_attention is not None and options.overlays:
        draw_pair_attention(match.pair_attention, query_image, image)
    return make_heatmap(query_features, maps, image, options.overlays, options.branch_overlays)


@dataclass
class QueryAnswerer:
    """Answers the query routes' queries with the loaded model, the open gallery and the heatmap stage's maps."""

    settings: Settings
    metrics: ServiceMetrics
    model: InferenceModel
    gallery: GalleryBase
    maps: MatchMaps  # the heatmap stage's gallery maps and their cache
    pair_head: Optional[PairHead]
    same_person: SamePersonRule

    def check_steps(self, options: QueryOptions, images: int, aggregate: str) -> None:
        """Optional steps that do not go together (422), then those this model lacks (409)."""
        if options.pair_attention and options.group_by_person:
            raise APIError(422, "invalid_request", GROUP_BY_REORDERED)
        if options.pair_attention and images > 1:
            raise APIError(
                422,
                "invalid_request",
                "pair_attention compares one query image's maps with each match's: not for a track",
            )
        if options.rerank and images > 1 and aggregate == "best":
            raise APIError(
                422, "invalid_request", "rerank re-ranks around one query embedding: for a track, use aggregate=mean"
            )
        if options.pair_attention:
            self.check_pair_attention(options.rerank)

    def check_pair_attention(self, rerank: bool) -> None:
        if rerank:
            raise APIError(
                422, "invalid_request", "rerank and pair_attention are two re-rankings of the shortlist: choose one"
            )
        if self.pair_head is None:
            raise APIError(
                409,
                "no_pair_head",
                f"pair_attention needs a pair head: this model "
                f"({self.model.path.name}) has none beside it "
                "and REID_PAIR_HEAD_PATH is unset (a CASN model's export writes <model>.pair_head.npz)",
            )

    async def answer(
        self, options: QueryOptions, vectors: np.ndarray, maps: Optional[ImageMaps], previews: list, watch: Stopwatch
    ) -> QueryResponse:
        """One query's answer from its embedded images. ``vectors`` [V, N*D] are what is searched: one image's
        embedding or a track's mean (V = 1), or each image of a best-of track; ``maps`` and ``previews`` are each
        query image's."""
        gallery = self.gallery
        shortlist = max(options.top_k, self.settings.rerank_shortlist) if options.reorders else options.top_k
        hits, sources = await search_index(gallery, vectors, shortlist, options)
        found = await gallery.items_with_embeddings([i for i, _ in hits])
        features = split_branches(vectors, self.model.contract.num_branches)  # [V, N, D]
        watch.lap("search")
        live = [(i, score) for i, score in hits if i in found]  # absent: a delete committed, not yet indexed
        ranking, known_maps = [{}] * len(live), {}
        if options.rerank:
            live, ranking = await asyncio.to_thread(rerank_hits, vectors[0], live, found, options.top_k, self.settings)
            watch.lap("rerank")
        if options.pair_attention:
            live, ranking, known_maps = await self.pair_rerank(vectors[0], maps[0], live, found, options.top_k)
            watch.lap("pair_attention")
        # a best-of track's match is scored, and explained, with the features of the image that gave its score
        features_by_id = {i: features[sources.get(i, 0)] for i, _ in live}
        matches = [
            match_body(
                rank,
                score,
                *found[i],
                features_by_id[i],
                same_person=self.same_person.decide(score),
                **fields,
                **({"track_image": sources[i]} if sources else {}),
            )
            for rank, ((i, score), fields) in enumerate(zip(live, ranking), 1)
        ]
        query_heatmaps = None
        if options.heatmaps:
            query_heatmaps, _ = await asyncio.gather(
                self.draw_query_heatmaps(features, maps, previews, options),
                self.add_heatmaps(matches, features_by_id, previews[0], known_maps, options),
            )
            watch.lap("heatmaps")
        track = len(previews) > 1
        return QueryResponse(
            matches=matches,
            query_heatmap=None if track or not query_heatmaps else query_heatmaps[0],
            track_heatmaps=query_heatmaps if track else None,
            gallery_size=gallery.size,
            timing_ms=watch.total(),
            reranked=options.reorders,
            heatmap_matches=sum(m.heatmap is not None for m in matches),
            same_person_threshold=self.same_person.describe(),
        )

    async def draw_query_heatmaps(
        self, features: np.ndarray, maps: ImageMaps, previews: list, options: QueryOptions
    ) -> List[Heatmap]:
        """Each query image's map for the features its matches were scored with: the one vector's (an image, a
        track's mean), or with one vector per image (a best-of track) the image's own."""
        per_image = features if len(features) > 1 else [features[0]] * len(previews)
        return list(
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        make_heatmap, per_image[j], maps[j], preview, options.overlays, options.branch_overlays
                    )
                    for j, preview in enumerate(previews)
                )
            )
        )

    async def pair_rerank(
        self, embedding: np.ndarray, query_maps: ImageMaps, hits: List[Tuple[int, float]], found: dict, top_k: int
    ):
        """CASN's pairwise stage (service.pair_ranking) over the shortlist ``hits``, with their maps (cached, or
        their stored images decoded and re-embedded in one batch): (first ``top_k`` hits, their Match fields,
        {id: maps}, kept so that the heatmaps of those matches need no second model call)."""
        maps = await self.maps.of([i for i, _ in hits], {}, stored=False)
        hits = [(i, score) for i, score in hits if i in maps]
        ranked, fields = await asyncio.to_thread(
            rank_shortlist, self.pair_head, embedding, query_maps, hits, found, maps, top_k
        )
        return ranked, fields, maps

    async def add_heatmaps(
        self,
        matches: List[Match],
        features_by_id: Dict[int, np.ndarray],
        query_image,
        known_maps: Dict[int, ImageMaps],
        options: QueryOptions,
    ) -> None:
        """The first REID_MAX_HEATMAP_MATCHES matches' feature maps (``known_maps``, cached, stored, or their
        stored images re-embedded in one batch: ``MatchMaps.of``), then their RAMs, drawn on previews only with
        overlays (a top_k=100 query drew 100 took 3.7 s and answered 17.7 MB), each for the query features it
        was scored with (``features_by_id``)."""
        limit = self.settings.max_heatmap_matches if options.heatmap_matches is None else options.heatmap_matches
        chosen = matches[:limit]
        ids = [m.id for m in chosen]
        decoded = await self.maps.decode_stored(ids, preview=True) if options.overlays else None
        maps = await self.maps.of(ids, known_maps, decoded)
        gone = {i for i in ids if i not in maps or (decoded is not None and i not in decoded)}  # deleted since
        matches[:] = [m for m in matches if m.id not in gone]
        chosen = [m for m in chosen if m.id not in gone]
        if not chosen:
            return
        # one worker thread per match: PIL and zlib release the GIL, so the overlays are drawn on every core
        heatmaps = await asyncio.gather(
            *(
                asyncio.to_thread(
                    match_heatmap,
                    features_by_id[m.id],
                    maps[m.id],
                    decoded[m.id].preview if decoded else None,
                    m,
                    query_image,
                    options,
                )
                for m in chosen
            )
        )
        for match, heatmap in zip(chosen, heatmaps):
            match.heatmap = heatmap
