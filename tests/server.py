"""What the service's tests check answers with: the error shape, enrolment, metrics, queries, the model's own
outputs, and RAM's sums; the server itself, and enrolling and querying it, are ``harness.server``'s."""

from pathlib import Path
from typing import List

import httpx

from harness.server import ServiceProcess, enrol, query


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """An answer in the API's one error shape, with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def onnx_outputs(model: Path, blobs: List[bytes], names: List[str]) -> list:
    """The model's outputs ``names`` on these image files, decoded as the service decodes them: what a test
    recomputes locally to check the server's answer."""
    import numpy as np
    import onnxruntime as ort

    from model_zoo.contract import INPUT_IMAGES, check_session
    from model_zoo.preprocess import load_for_model

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    contract = check_session(session)
    pixels = np.stack([load_for_model(b, contract.input_height, contract.input_width) for b in blobs])
    return session.run(names, {INPUT_IMAGES: pixels})


def assert_heatmaps_sum_to_scores(model: Path, store: Path, architecture: str, num_branches: int) -> None:
    """Serve ``model`` unchanged, enrol four tiny images, query one: the same image first at score 1, and every
    match's RAM grid and branch scores averaging to its score (CAMA eq. 10)."""
    import numpy as np
    import pytest

    from tests.conftest import image_bytes

    with ServiceProcess(model, store) as server, server.client() as client:
        info = client.get("/model").json()
        assert info["architecture"] == architecture and info["num_branches"] == num_branches
        blobs = [image_bytes(pid, v) for pid in (1, 2) for v in (1, 2)]
        enrol(client, blobs)
        body = query(client, blobs[0], top_k=4).json()
        assert body["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        for match in body["matches"]:
            assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-4)
            assert np.mean(match["branch_scores"]) == pytest.approx(match["score"], abs=1e-4)
            assert np.array(match["heatmap"]["branch_grids"]).shape[0] == num_branches
