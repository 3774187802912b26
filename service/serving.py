"""What a ready service holds, typed: built by ``service.app``'s lifespan once the model and the gallery are
loaded, and read by every route through ``service.routes.common.state`` (503 ``not_ready`` before)."""

from dataclasses import dataclass
from typing import Optional

from model_zoo.pair_attention import PairHead
from service.answering import QueryAnswerer
from service.batching import MicroBatcher
from service.gallery import GalleryBase
from service.inference import InferenceModel
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.uploads import ImageDecoder
from service.verification import SamePersonRule


@dataclass
class Serving:
    settings: Settings
    metrics: ServiceMetrics
    model: InferenceModel
    gallery: GalleryBase
    batcher: MicroBatcher
    decoder: ImageDecoder  # uploads into model input, within the decode memory budget
    answerer: QueryAnswerer  # the query routes' answers: search, re-ranking, heatmaps
    pair_head: Optional[PairHead]  # CASN's pairwise stage, when the model has one
    same_person: SamePersonRule
