"""A Python client for the re-ID service's HTTP API: ``ReIDClient`` (sync) and ``AsyncReIDClient`` (async),
both on httpx, with typed results, and ``python -m client`` (enrol a folder, query an image, print or save the
result with its overlays) as a thin CLI over them.

Owns only the client side of the API that ``service/`` serves (docs/api.md). Imports httpx and the
standard library; never ``service``, ``model_zoo``, ``training`` or torch, so it installs alone
(``pip install reid-retrieval[client]``).
"""

from client.api import AsyncReIDClient, ReIDClient
from client.types import BatchResult, EnrolledItem, GalleryPage, Match, QueryResult, ReIDError, Verification

__all__ = [
    "AsyncReIDClient",
    "ReIDClient",
    "BatchResult",
    "EnrolledItem",
    "GalleryPage",
    "Match",
    "QueryResult",
    "ReIDError",
    "Verification",
]
