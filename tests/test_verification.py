"""Same person or not: the threshold calibration (training/calibration.py) against hand cases, its record in
the model file, and POST /verify and same_person on a real server."""

import asyncio
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from client import AsyncReIDClient, ReIDClient
from model_zoo.contract import check_session
from tests.conftest import image_bytes
from harness.server import ServiceProcess, enrol, query
from tests.server import assert_error
from training.calibration import calibrate, onnx_set_embedder, pair_scores, rates, roc, threshold_at, write_verification


def test_pairs_are_genuine_across_cameras_impostor_across_people_and_scored_as_the_service_does():
    # two branches of 1-d features, so each image's score with another is the mean of two signs
    embeddings = np.array([[1, 1], [1, 1], [1, -1], [-1, -1]], np.float32)
    genuine, impostor = pair_scores(embeddings, pids=[7, 7, 7, 8], cams=[1, 2, 1, 1], num_branches=2)
    # (0,1): person 7 on cameras 1 and 2; (0,2) is person 7 on one camera: neither; (1,2): cameras 2 and 1
    assert sorted(genuine.tolist()) == [0.0, 1.0]
    assert sorted(impostor.tolist()) == [-1.0, -1.0, 0.0]  # person 8 against each of person 7's three images


def test_the_threshold_lets_at_most_the_target_share_of_impostors_through():
    impostor = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], np.float32)
    genuine = np.array([0.85, 0.92, 0.97, 0.99], np.float32)
    assert threshold_at(impostor, 0.1) == pytest.approx(0.9)  # one impostor (0.95) above it
    assert threshold_at(impostor, 0.05) == pytest.approx(0.95)  # none above it
    assert rates(genuine, impostor, 0.9) == {"fmr": 0.1, "tmr": 0.75, "genuine_pairs": 4, "impostor_pairs": 10}
    assert [p["fmr"] <= p["target_fmr"] for p in roc(genuine, impostor, (0.05, 0.1, 0.3))] == [True] * 3
    assert threshold_at(impostor, 1.0) == -1.0  # every impostor allowed: everything is the same person


@pytest.fixture(scope="module")
def calibrated_model(tiny_model, market_root, tmp_path_factory):
    """A copy of the tiny model with its threshold calibrated on the tiny market's test split."""
    path = tmp_path_factory.mktemp("calibrated") / "model.onnx"
    shutil.copy(tiny_model[1], path)
    record = calibrate(onnx_set_embedder(path, progress=False), [market_root, market_root], target_fmr=0.1)
    write_verification(path, record)
    return path, record


def test_calibration_is_written_into_the_model_file_and_read_by_the_contract(calibrated_model):
    path, record = calibrated_model
    assert record["genuine_pairs"] == 8 and record["impostor_pairs"] == 54 and record["fmr"] <= 0.1
    assert record["held_out"]["market"]["fmr"] == record["fmr"]  # the same set again: the same rates
    assert [p["target_fmr"] for p in record["roc"]] == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    contract = check_session(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    assert contract.verification == record


def test_verify_answers_the_score_and_the_decision_at_the_models_threshold(calibrated_model, tiny_model, tmp_path):
    path, record = calibrated_model
    with ServiceProcess(path, tmp_path / "g.sqlite3") as server, server.client() as client:
        same = client.post(
            "/verify", files={"image_a": ("a.jpg", image_bytes(5000, 1)), "image_b": ("b.jpg", image_bytes(5000, 1))}
        ).json()
        assert same["score"] == pytest.approx(1.0, abs=1e-5) and same["same_person"] is True
        assert same["threshold"] == record["threshold"] and same["threshold_source"] == "model"
        assert same["calibration"]["target_fmr"] == 0.1 and "roc" not in same["calibration"]
        other = client.post(
            "/verify", files={"image_a": ("a.jpg", image_bytes(5000, 1)), "image_b": ("b.jpg", image_bytes(5001, 2))}
        ).json()
        assert np.mean(other["branch_scores"]) == pytest.approx(other["score"], abs=1e-6)
        assert other["same_person"] is (other["score"] > record["threshold"])
        enrol(client, [image_bytes(5000, 1), image_bytes(5002, 3)])
        answer = query(client, image_bytes(5000, 1), heatmaps=False).json()
        matches = answer["matches"]
        assert [m["same_person"] for m in matches] == [m["score"] > record["threshold"] for m in matches] and matches[
            0
        ]["same_person"]
        assert answer["same_person_threshold"] == {
            "threshold": record["threshold"],
            "source": "model",
            "calibrated_on": record["calibrated_on"],
            "target_fmr": 0.1,
        }  # where the decisions come from, with every answer
        assert_error(client.post("/verify", files={"image_a": ("a.jpg", image_bytes(5000, 1))}), 422, "invalid_request")
        assert_error(
            client.post(
                "/verify", files={"image_a": ("a.jpg", image_bytes(5000, 1)), "image_b": ("b.jpg", b"not an image")}
            ),
            400,
            "invalid_image",
        )
    with ServiceProcess(tiny_model[1], tmp_path / "h.sqlite3") as server, server.client() as client:  # not calibrated
        body = client.post(
            "/verify", files={"image_a": ("a.jpg", image_bytes(5000, 1)), "image_b": ("b.jpg", image_bytes(5000, 1))}
        ).json()
        assert body["same_person"] is None and body["threshold"] is None and body["calibration"] == {}
        enrol(client, [image_bytes(5000, 1)])
        assert query(client, image_bytes(5000, 1), heatmaps=False).json()["same_person_threshold"] is None
    with pytest.raises(RuntimeError, match="verify_threshold"):  # outside [-1, 1]: the start is refused
        ServiceProcess(tiny_model[1], tmp_path / "i.sqlite3", verify_threshold=1.5).start()


def test_a_threshold_setting_overrides_the_models_and_both_clients_verify(calibrated_model, tmp_path):
    pair = (image_bytes(5000, 1), image_bytes(5001, 2))
    with ServiceProcess(calibrated_model[0], tmp_path / "g.sqlite3", verify_threshold=0.999999) as server:
        with ReIDClient(server.url) as reid:
            answer = reid.verify(*pair)

        async def verify_async():
            async with AsyncReIDClient(server.url) as reid:
                return await reid.verify(*pair)

        assert asyncio.run(verify_async()).score == answer.score
    assert answer.threshold == 0.999999 and answer.threshold_source == "setting" and answer.same_person is False
