"""Liveness, readiness, the loaded model's contract, and the Prometheus metrics."""

from dataclasses import asdict
from functools import partial

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

from service.errors import ERROR_SCHEMA, APIError
from service.routes.common import ERRORS, PROTECTED, state
from service.schemas import ReadyResponse

METRICS_RESPONSE = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


async def healthz():
    return {"status": "ok"}


async def readyz(request: Request):
    s = state(request)
    problem = await s.gallery.readiness_problem()
    if problem:
        raise APIError(503, "model_changed", f"{problem}: restart this replica with that model")
    size = await s.gallery.current_size()
    return ReadyResponse(
        ready=True,
        provider={**asdict(s.model.providers), "fell_back": s.model.providers.fell_back},
        index=s.gallery.describe_index(),
        gallery_size=size,
        model_fingerprint=s.model.fingerprint,
    )


async def model_info(request: Request):
    s = state(request)
    return {
        **asdict(s.model.contract),
        "embedding_dim": s.model.contract.embedding_dim,
        "fingerprint": s.model.fingerprint,
        "file": s.model.path.name,
        "precision": s.model.precision,
        "adaptation": s.model.adaptation,  # null, or the source and crops of a `training adapt` file
        # what the optional query steps can use: CASN's pair head (pair_attention=true), CLPD-style attention maps
        "pair_head": s.pair_head is not None,
        "attention_maps": s.model.has_attention_maps,
    }


async def prometheus(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def add_routes(app: FastAPI) -> None:
    """Liveness and readiness for anyone; the model and the metrics behind the API key."""
    route = partial(app.add_api_route, methods=["GET"], tags=["health"])
    route("/healthz", healthz)
    route("/readyz", readyz, response_model=ReadyResponse, responses={503: ERROR_SCHEMA})
    route("/model", model_info, dependencies=PROTECTED, responses=ERRORS)
    route(
        "/metrics",
        prometheus,
        dependencies=PROTECTED,
        response_class=PlainTextResponse,
        responses={**ERRORS, **METRICS_RESPONSE},
    )
