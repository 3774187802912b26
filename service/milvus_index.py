"""The cluster gallery's index: one Milvus collection that every replica searches and writes, over inner
product, with the scalar fields the query filters look at (person, camera, capture time) and the metadata.

Filters run inside Milvus, as a boolean expression (``search_filter``). Values are written as JSON string
literals, whose escapes (``\\"``, ``\\\\``) Milvus' expression grammar reads the same way, so a person id
with quotes or backslashes cannot change the expression. Every read and write asks for Strong consistency:
a search on one replica sees what another has just acknowledged.
"""

import json
import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.exceptions import MilvusException

from service.store import Item
from service.validation import MAX_ID_LENGTH

log = logging.getLogger(__name__)
MAX_LIMIT = 16384  # Milvus' largest top-k
LABEL_BYTES = 4 * MAX_ID_LENGTH  # VARCHAR lengths count UTF-8 bytes
STRONG = "Strong"
COLLECTION_NOT_LOADED = 101  # Milvus' error code for a search on a released collection
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# pymilvus pings an idle connection every 10 s; a gRPC server with gRPC's default keepalive enforcement (milvus-lite's)
# answers the third such ping with GOAWAY "too_many_pings", and a call that races the GOAWAY fails. So ping only
# while a call is in flight: pymilvus checks a connection idle for 30 s itself before it uses it.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False}


def milvus_client(uri: str, token: Optional[str] = None, **kwargs) -> MilvusClient:
    return MilvusClient(uri=uri, token=token or "", grpc_options=GRPC_OPTIONS, **kwargs)


def literal(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def filterable(value: Any) -> Any:
    """Metadata as Milvus' JSON can hold it, for filters: integers beyond 64 bits (which strict JSON allows)
    become floats, or text past a float's range. Answers come from PostgreSQL's exact copy."""
    if isinstance(value, dict):
        return {key: filterable(v) for key, v in value.items()}
    if isinstance(value, list):
        return [filterable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        try:
            return float(value)
        except OverflowError:
            return str(value)
    return value


def search_filter(
    camera_id: Optional[str] = None,
    exclude_camera_id: Optional[str] = None,
    person_id: Optional[str] = None,
    captured_after: Optional[float] = None,
    captured_before: Optional[float] = None,
) -> str:
    """The query filters as a Milvus expression, with the embedded gallery's meaning: an item of unknown camera
    is not excluded by exclude_camera_id; one of unknown capture time is in no time range."""
    terms = []
    if camera_id is not None:
        terms.append(f"camera_id == {literal(camera_id)}")
    if exclude_camera_id is not None:
        terms.append(f"(camera_id is null or camera_id != {literal(exclude_camera_id)})")
    if person_id is not None:
        terms.append(f"person_id == {literal(person_id)}")
    if captured_after is not None:
        terms.append(f"captured_at >= {float(captured_after)!r}")
    if captured_before is not None:
        terms.append(f"captured_at < {float(captured_before)!r}")
    return " and ".join(terms)


class MilvusIndex:
    def __init__(self, uri: str, token: Optional[str], collection: str, dim: int, index_type: str):
        self.client = milvus_client(uri, token)
        self.collection, self.dim, self.index_type = collection, dim, index_type

    def close(self) -> None:
        self.client.close()

    def ensure(self) -> bool:
        """Create the collection when it is missing, or held vectors of another size (a model change); True
        when it was created and so is empty."""
        if self.client.has_collection(self.collection):
            fields = self.client.describe_collection(self.collection)["fields"]
            dim = next(int(f["params"]["dim"]) for f in fields if f["name"] == "embedding")
            if dim == self.dim:
                self.load()
                return False
            log.warning(
                "Milvus collection %s holds %d-d vectors, the model makes %d-d: recreating it",
                self.collection,
                dim,
                self.dim,
            )
        self.recreate()
        return True

    def recreate(self) -> None:
        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("person_id", DataType.VARCHAR, max_length=LABEL_BYTES, nullable=True)
        schema.add_field("camera_id", DataType.VARCHAR, max_length=LABEL_BYTES, nullable=True)
        schema.add_field("captured_at", DataType.DOUBLE, nullable=True)
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("metadata", DataType.JSON)
        index = self.client.prepare_index_params()
        index.add_index("embedding", index_type=self.index_type, metric_type="IP")
        self.client.create_collection(self.collection, schema=schema, index_params=index, consistency_level=STRONG)

    def upsert(self, items: Sequence[Item], embeddings: Iterable[np.ndarray]) -> None:
        """Upsert, not insert: Milvus does not refuse a primary key it already holds, and a repair may write an
        item that a write in flight writes too."""
        rows = [
            {
                "id": item.id,
                "embedding": np.asarray(vector, np.float32).tolist(),
                "person_id": item.person_id,
                "camera_id": item.camera_id,
                "captured_at": item.captured_at,
                "created_at": item.created_at,
                "metadata": filterable(item.metadata),
            }
            for item, vector in zip(items, embeddings)
        ]
        if rows:
            self.client.upsert(self.collection, rows)

    def delete(self, ids: Sequence[int]) -> None:
        if len(ids):
            self.client.delete(self.collection, ids=[int(i) for i in ids])

    def ids(self, batch: int = 10_000) -> Set[int]:
        iterator = self.client.query_iterator(self.collection, batch_size=batch, filter="", output_fields=["id"])
        found: Set[int] = set()
        try:
            while True:
                rows = iterator.next()
                if not rows:
                    return found
                found.update(int(row["id"]) for row in rows)
        finally:
            iterator.close()

    def search(self, vector: np.ndarray, limit: int, expression: str = "") -> List[Tuple[int, float, Optional[str]]]:
        """Up to ``limit`` (id, inner product, person_id), best first."""
        try:
            return self._search(vector, limit, expression)
        except MilvusException as exc:
            if exc.code != COLLECTION_NOT_LOADED:
                raise
            self.load()
            return self._search(vector, limit, expression)

    def _search(self, vector: np.ndarray, limit: int, expression: str) -> List[Tuple[int, float, Optional[str]]]:
        found = self.client.search(
            self.collection,
            data=[np.asarray(vector, np.float32).tolist()],
            limit=min(limit, MAX_LIMIT),
            filter=expression,
            output_fields=["person_id"],
            search_params={"metric_type": "IP"},
            consistency_level=STRONG,
        )
        return [(int(hit["id"]), float(hit["distance"]), hit["entity"].get("person_id")) for hit in found[0]]

    def check(self) -> None:
        """Raises unless Milvus answers and holds the collection, loaded for searches."""
        if not self.client.has_collection(self.collection):
            raise MilvusException(
                message=f"the collection {self.collection} is gone (a restarted replica recreates it from PostgreSQL)"
            )
        self.load()

    def load(self) -> None:
        """Load the collection into Milvus' memory unless it is: a restarted Milvus may hold it released."""
        if self.client.get_load_state(self.collection)["state"] != LoadState.Loaded:
            self.client.load_collection(self.collection)

    def describe(self) -> Dict[str, object]:
        return {"collection": self.collection, "index_type": self.index_type}
