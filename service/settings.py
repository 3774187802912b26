"""Every setting, from environment variables prefixed ``REID_`` (see docs/settings.md)."""

from pathlib import Path
from typing import List, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.rerank import DEFAULT_K1, DEFAULT_K2, DEFAULT_LAMBDA


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REID_", env_file=None, protected_namespaces=())

    model_path: Path = Field(DEFAULT_MODEL_PATH, description="ONNX model following model_zoo/CONTRACT.md")
    model_precision: Literal["fp32", "int8", "fp16"] = Field(
        "fp32",
        description="fp32: serve REID_MODEL_PATH; int8: "
        "serve <model stem>.int8.onnx beside "
        "it (python -m training quantize "
        "writes it: for CPUs); fp16: <model "
        "stem>.fp16.onnx (python -m training "
        "fp16: for GPUs); a missing file "
        "refuses the start",
    )
    store_path: Path = Field(
        Path("var/gallery.sqlite3"),
        description="SQLite gallery file (created if missing; REID_GALLERY_BACKEND=embedded)",
    )
    gallery_backend: Literal["embedded", "cluster"] = Field(
        "embedded",
        description="embedded: SQLite "
        "(REID_STORE_PATH) and FAISS in "
        "this process, one server; "
        "cluster: PostgreSQL "
        "(REID_POSTGRES_DSN) and Milvus "
        "(REID_MILVUS_URI) shared by every "
        "replica (pip extra [cluster])",
    )
    postgres_dsn: Optional[SecretStr] = Field(
        None, description="cluster: the PostgreSQL gallery, postgresql://user:password@host:5432/dbname"
    )
    milvus_uri: str = Field("http://127.0.0.1:19530", description="cluster: the Milvus server")
    milvus_token: Optional[SecretStr] = Field(
        None, description="cluster: Milvus credentials, user:password or an API key (unset: none)"
    )
    milvus_collection: str = Field(
        "reid_gallery",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$",
        description="cluster: the Milvus collection every replica shares",
    )
    milvus_index_type: Literal["AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW", "GPU_CAGRA", "GPU_IVF_FLAT"] = Field(
        "AUTOINDEX",
        description="cluster: the Milvus index over the embeddings (inner product), used when the collection is "
        "created; GPU_* need Milvus' GPU build",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    api_key: Optional[SecretStr] = Field(
        None,
        description="if set, every route but /healthz, /readyz, / and the API "
        "docs needs header X-API-Key, checked before any body is "
        "read",
    )
    allowed_origins: str = Field(
        "",
        description="comma-separated web origins (https://host[:port]) whose pages may "
        "call the API: their writes pass the cross-site check, and CORS "
        "answers them; empty: same-origin pages only",
    )
    execution_provider: Literal["auto", "cuda", "tensorrt", "cpu"] = Field(
        "auto",
        description="auto: CUDA when ONNX Runtime can use it, else CPU; cuda: refuse to start without it; tensorrt: "
        "TensorRT first (CUDA, then CPU, for what it does not take), refusing to start without it",
    )
    tensorrt_cache_dir: Optional[Path] = Field(
        None,
        description="where TensorRT keeps the engines it builds and its "
        "timing cache, so a restart does not build them again "
        "(unset: tensorrt-cache beside the store)",
    )
    model_instances: int = Field(
        0,
        ge=0,
        description="model calls that run at once, each on its own batch (0: one per core on the CPU, counting a "
        "cgroup CPU quota; 1 on CUDA); with several on the CPU, a batch that finds no other call running and nothing "
        "waiting (a lone query) runs on all their threads",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per model call (0: cores / instances on "
        "the CPU, ONNX Runtime's default on CUDA)",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="most images embedded in one model call")
    max_batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="how long the first image of a batch waits for others"
    )
    max_queued_images: int = Field(
        1024, ge=1, description="images waiting for the model beyond which a request is refused with 503 overloaded"
    )
    index_type: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto",
        description="auto: exact (flat) while a scan reads fewer than 100M floats (items x embedding "
        "dimensions: 390k items of 256-d), past it HNSW on the CPU, IVF where FAISS has a GPU; flat: always "
        "exact; ivf or hnsw: approximate",
    )
    index_device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where FAISS searches: auto uses a GPU when FAISS sees one"
    )
    ivf_nlist: int = Field(1024, ge=1, description="IVF lists (capped at gallery size / 39)")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists searched per query")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node")
    hnsw_ef_search: int = Field(
        512,
        ge=1,
        description="HNSW search breadth (candidates kept per search): 512 met recall@10 0.95 for real "
        "queries at a million items",
    )
    index_reduce_dim: int = Field(
        0,
        ge=0,
        description="0: the index holds full embeddings; N: it holds them reduced "
        "to N dimensions (an uncentred PCA learnt from the gallery once "
        "it has 1000 items), and each query's shortlist is re-scored "
        "exactly from the store, so scores stay exact: for galleries "
        "too large for memory in full (1M x 3840-d is 15 GB, at 256-d 1 "
        "GB)",
    )
    index_rescore_candidates: int = Field(
        100,
        ge=1,
        le=10000,
        description="with REID_INDEX_REDUCE_DIM: the shortlist a query re-scores exactly (at least twice its top_k)",
    )
    on_model_change: Literal["reembed", "refuse"] = Field(
        "reembed",
        description="a gallery embedded by another model "
        "is re-embedded from its stored "
        "images, or the start is refused",
    )
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted image file")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted width x height")
    max_images_per_request: int = Field(
        64, ge=1, description="most images in one POST /gallery, one track on POST /query, one POST /query/batch"
    )
    max_top_k: int = Field(100, ge=1, description="largest top_k a query may ask for")
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        description="most pixels one request may decode, summed over "
        "its images (a large JPEG counts at the reduced "
        "scale it is decoded at)",
    )
    max_decode_mb: int = Field(
        1024,
        ge=64,
        description="memory all concurrent image decodes may take together "
        "(estimated at 17 bytes a decoded pixel: a lossless WebP, the "
        "costliest format measured, peaks at 16.1); a decode waits for "
        "room, one larger than all of it waits to run alone",
    )
    decode_threads: int = Field(0, ge=0, description="threads that decode uploads; 0: one per CPU core")
    max_heatmap_matches: int = Field(
        10, ge=0, description="a query draws heatmaps for its first this many matches only"
    )
    max_batch_heatmaps: int = Field(
        22,
        ge=0,
        description="heatmaps one POST /query/batch draws in all, its queries' "
        "own and their matches', in upload order; later queries "
        "answer without",
    )
    heatmap_cache_mb: int = Field(
        256,
        ge=0,
        description="memory for gallery items' feature maps kept (float16, least "
        "recently used first out) so a match drawn again needs no "
        "model call; 0: none",
    )
    stored_maps_max_kb: int = Field(
        128,
        ge=0,
        description="store each enrolled item's feature maps (int8, service.stored_maps) when they take at most "
        "this many kB, so a heatmap reads its matches' maps instead of re-embedding them (the default model: "
        "104.5 kB an item, retail-0277 alone 34.8 kB); 0: never",
    )
    verify_threshold: Optional[float] = Field(
        None,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="same person when the score is above this (POST /verify, same_person per match); unset: the "
        "model's calibrated threshold (reid.verification) when it has one, else same_person is null",
    )
    rerank_shortlist: int = Field(
        100,
        ge=1,
        le=2000,
        description="index hits a query with rerank=true or pair_attention=true re-ranks (at least its top_k)",
    )
    rerank_k1: int = Field(
        DEFAULT_K1, ge=1, description="re-ranking: k-reciprocal neighbourhood size (clamped to the shortlist's size)"
    )
    rerank_k2: int = Field(
        DEFAULT_K2, ge=1, description="re-ranking: local query expansion size (clamped to the shortlist's size + 1)"
    )
    rerank_lambda: float = Field(
        DEFAULT_LAMBDA, ge=0, le=1, description="re-ranking: weight of the plain distance against the Jaccard distance"
    )
    pair_head_path: Optional[Path] = Field(
        None,
        description="CASN's pair-head artifact, for queries with "
        "pair_attention=true; unset: <model stem>.pair_head.npz "
        "beside the model when that file exists, else none. A "
        "missing file, or one exported with another model file, "
        "refuses the start",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's headers, from "
        "connecting or from the previous response; then the "
        "connection is closed",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds a request body may pause (no byte arriving while "
        "the server is ready to read); then the connection is closed",
    )
    max_header_bytes: int = Field(65536, ge=1024, description="largest request header block (431 past it)")
    min_body_bytes_per_s: int = Field(
        500,
        ge=0,
        description="bytes a second a request body must average over each "
        "REID_BODY_TIMEOUT_S window while the server is ready to "
        "read (a trickle holds a connection otherwise); then the "
        "connection is closed; 0: only the pause limit",
    )
    max_connections: int = Field(
        512, ge=1, description="open connections past which a new connection's request is answered 503 overloaded"
    )
    max_connections_per_client: int = Field(
        64,
        ge=0,
        description="open connections one client address may hold; past "
        "it, its new connection's request is answered 503 "
        "overloaded; 0: no cap (behind a proxy every "
        "connection has the proxy's address: cap clients "
        "there)",
    )
    retention_days: float = Field(
        0,
        ge=0,
        allow_inf_nan=False,
        description="erase items older than this many days (by "
        "capture time when known, else enrolment "
        "time; fractions allowed), at start and "
        "every REID_RETENTION_INTERVAL_S; 0: keep "
        "forever",
    )
    retention_interval_s: float = Field(
        3600, gt=0, allow_inf_nan=False, description="seconds between retention purges (with REID_RETENTION_DAYS > 0)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "warning", description="uvicorn and service log level"
    )
    tracing: Literal["off", "console", "otlp"] = Field(
        "off",
        description="OpenTelemetry spans per request, continuing "
        "a W3C traceparent: console (stdout) or otlp "
        "(to OTEL_EXPORTER_OTLP_ENDPOINT)",
    )

    @field_validator("model_path", mode="before")
    @classmethod
    def empty_means_default(cls, value):
        # docker-compose passes unset variables through as "", which must mean "the shipped model"
        return DEFAULT_MODEL_PATH if value in ("", None) else value

    @field_validator("pair_head_path", "verify_threshold", "postgres_dsn", "milvus_token", mode="before")
    @classmethod
    def empty_means_unset(cls, value):
        return None if value == "" else value

    @property
    def origins(self) -> List[str]:
        """REID_ALLOWED_ORIGINS as a list (a plain string in the environment, not JSON)."""
        return [origin.strip().rstrip("/") for origin in self.allowed_origins.split(",") if origin.strip()]

    @model_validator(mode="after")
    def cluster_names_its_database(self):
        if self.gallery_backend == "cluster" and self.postgres_dsn is None:
            raise ValueError(
                "REID_GALLERY_BACKEND=cluster needs REID_POSTGRES_DSN (postgresql://user:password@host:5432/dbname)"
            )
        return self

    @model_validator(mode="after")
    def one_request_fits_the_queue(self):
        # One request queues up to max_images_per_request images (an enrolment) or its heatmap matches (a query's
        # first matches re-embedded) at once: past max_queued_images it would be refused with 503 forever.
        heatmap_batch = min(self.max_top_k, self.max_heatmap_matches)
        if self.max_queued_images < max(self.max_images_per_request, heatmap_batch):
            raise ValueError(
                f"REID_MAX_QUEUED_IMAGES={self.max_queued_images} is below "
                f"REID_MAX_IMAGES_PER_REQUEST={self.max_images_per_request} "
                f"or the heatmap matches of a query ({heatmap_batch}): such a request could never be "
                f"queued"
            )
        return self
