"""Property-based fuzz against a real server (issue 12): no answer is a 5xx, every 4xx has the documented
error shape, and a refused request leaves the gallery as it was.

Two parts: schemathesis generates requests for every operation of the OpenAPI schema, valid and invalid by
it; and a hypothesis strategy of our own sends real images with arbitrary ids and metadata, which the schema
alone would never reach past image decoding. Deterministic (derandomize) and bounded (max_examples) for CI.
"""

import json
import math

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

from tests.conftest import image_bytes
from harness.server import ServiceProcess

pytestmark = pytest.mark.slow
BOUNDED = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SCHEMA_EXAMPLES = 50  # per operation and mode: about 1,000 requests, under a minute here


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz") / "gallery.sqlite3"
    with ServiceProcess(
        tiny_model[1], store, max_image_bytes=300_000, max_images_per_request=8, max_top_k=20
    ) as process:
        with process.client() as client:  # a few items, so that small ids name real ones
            seeded = client.post(
                "/gallery", files=[("images", (f"{v}.jpg", image_bytes(1, v), "image/jpeg")) for v in range(3)]
            )
            assert seeded.status_code == 201, seeded.text
        yield process


class GalleryWatch:
    """The gallery as last seen, to tell that a refused request changed nothing."""

    def __init__(self, session: requests.Session, url: str):
        self.session, self.url = session, url
        self.seen = self.snapshot()

    def snapshot(self):
        page = self.session.get(self.url + "/gallery", params={"limit": 500}, timeout=30).json()
        return page["total"], [(item["id"], item["metadata"]) for item in page["items"]]

    def check(self, response, request: str) -> None:
        status = response.status_code
        assert status < 500, f"{request} -> {status} {response.text[:300]}"
        now = self.snapshot()
        if 400 <= status < 500:
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, f"{request} -> {status} {body}"
            assert all(isinstance(v, str) and v for v in body["error"].values()), f"{request} -> {body}"
            assert now == self.seen, f"{request} -> {status} changed the gallery"
        self.seen = now


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_operation_of_the_schema_fuzzed(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    sent = []
    with requests.Session() as session:
        watch = GalleryWatch(session, server.url)
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(BOUNDED, max_examples=SCHEMA_EXAMPLES)
            @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            def fuzz(case):
                response = case.call(base_url=server.url, session=session, timeout=30)
                watch.check(response, f"{case.method} {case.formatted_path} {case.query or ''}")
                sent.append(case.method)

            try:
                fuzz()
            except Unsatisfiable:  # negative mode on an operation without parameters: nothing to break
                assert mode == "negative", operation.label
    assert len(sent) > 5 * SCHEMA_EXAMPLES


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=40,
)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # what a form field can carry: UTF-8


def children(value) -> list:
    return list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else []


def deepest(value, depth: int = 1) -> int:
    return max((deepest(child, depth + 1) for child in children(value)), default=depth)


def finite(value) -> bool:
    return math.isfinite(value) if isinstance(value, float) else all(finite(child) for child in children(value))


@settings(BOUNDED, max_examples=150)
@given(
    person=st.none() | TEXT,
    camera=st.none() | TEXT,
    metadata=st.none() | st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4).map(json.dumps) | TEXT,
)
def test_enrolments_with_arbitrary_ids_and_metadata_are_stored_as_sent_or_refused(server, person, camera, metadata):
    with requests.Session() as session:
        watch = GalleryWatch(session, server.url)
        data = {
            key: value
            for key, value in (("person_id", person), ("camera_id", camera), ("metadata", metadata))
            if value is not None
        }
        response = session.post(
            server.url + "/gallery",
            files=[("images", ("a.jpg", image_bytes(2, 1), "image/jpeg"))],
            data=data,
            timeout=30,
        )
        watch.check(response, f"POST /gallery {data!r}")
        if response.status_code != 201:
            return
        [item] = response.json()["items"]
        stored = session.get(f"{server.url}/gallery/{item['id']}", timeout=30).json()
        assert stored == item and (stored["person_id"], stored["camera_id"]) == (person or None, camera or None)
        sent = json.loads(metadata) if metadata else {}
        assert stored["metadata"] == sent and finite(sent) and deepest(sent) <= 32
        assert session.delete(f"{server.url}/gallery/{item['id']}", timeout=30).status_code == 204
