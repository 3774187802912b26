"""``python -m training fp16`` on the tiny exported model: the fp16 file beside it follows the contract (the
identity exact, the contract's nodes float32), agrees with the fp32 file, and is served with
REID_MODEL_PRECISION=fp16. Only on the CPU: what it gains on a GPU is not measured here."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from model_zoo.contract import (
    INPUT_IMAGES,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    PRECISION_KEY,
    QUANTIZATION_KEY,
    identity_error,
    open_cpu_session,
    precision_of,
)
from model_zoo.files import sha256_of
from model_zoo.preprocess import load_for_model
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, image_bytes
from harness.server import ServiceProcess, enrol, query
from training.half_precision import convert_to_fp16, drop_round_trips
from training.quantize import float_nodes


@pytest.fixture(scope="module")
def halved(tiny_model, market_root, tmp_path_factory):
    fp32 = tmp_path_factory.mktemp("fp16") / "model.onnx"
    shutil.copy(tiny_model[1], fp32)
    return fp32, fp32.with_name("model.fp16.onnx"), convert_to_fp16(fp32, [market_root], agreement_images=24)


def test_the_fp16_file_lies_beside_the_model_with_float16_weights_and_the_same_interface(halved):
    fp32, fp16, summary = halved
    assert summary["output"] == str(fp16) and summary["bytes"] < 0.6 * summary["fp32_bytes"]
    model = onnx.load(str(fp16))
    onnx.checker.check_model(model)  # topologically sorted again after the converter's appended Casts
    kept = float_nodes(
        onnx.load(str(fp32)).graph
    )  # their weights (here each branch's map-making convolution) stay float32
    read_elsewhere = {tensor for node in model.graph.node if node.name not in kept for tensor in node.input}
    assert {t.data_type for t in model.graph.initializer if t.name in read_elsewhere and np.prod(t.dims) > 64} == {
        TensorProto.FLOAT16
    }
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.UINT8]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT}
    metadata = open_cpu_session(fp16)[0].get_modelmeta().custom_metadata_map
    assert precision_of(metadata) == "fp16" and json.loads(metadata[QUANTIZATION_KEY])["format"] == "float16"
    assert {k: v for k, v in metadata.items() if k not in (PRECISION_KEY, QUANTIZATION_KEY)} == {
        k: v for k, v in open_cpu_session(fp32)[0].get_modelmeta().custom_metadata_map.items() if k.startswith("reid.")
    }


def test_the_contract_nodes_stay_float32_so_the_identity_is_exact_and_the_embeddings_agree(halved, market_root):
    fp32, fp16, summary = halved
    kept = float_nodes(onnx.load(str(fp32)).graph)
    half = {node.name: node for node in onnx.load(str(fp16)).graph.node}
    assert kept <= set(half)  # the converter keeps their names; they compute in float32
    pixels = np.stack(
        [load_for_model(p, TINY_HEIGHT, TINY_WIDTH) for p in sorted((market_root / "bounding_box_test").iterdir())]
    )
    embedding, maps = open_cpu_session(fp16)[0].run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: pixels})
    assert identity_error(embedding, maps) < 1e-6 and max(summary["identity"].values()) < 1e-6
    (reference,) = open_cpu_session(fp32)[0].run([OUTPUT_EMBEDDING], {INPUT_IMAGES: pixels})
    assert (reference * embedding).sum(axis=1).min() / 2 > 0.999 and summary["fp16"]["agreement"]["mean_cosine"] > 0.999


def test_a_float16_round_trip_between_float32_tensors_is_dropped_and_a_real_cast_kept():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Cast", ["a16"], ["a32"], to=TensorProto.FLOAT, name="up"),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT, name="widen"),
        helper.make_node("Add", ["a32", "h32"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph)
    assert drop_round_trips(model) == 1
    ops = {node.name: (node.op_type, list(node.input)) for node in model.graph.node}
    assert ops == {
        "relu": ("Relu", ["x"]),
        "up": ("Identity", ["a"]),
        "widen": ("Cast", ["h"]),
        "add": ("Add", ["a32", "h32"]),
    }


def test_fp16_refuses_a_file_that_is_not_fp32(halved, market_root, tmp_path):
    _, fp16, _ = halved
    with pytest.raises(ValueError, match="already fp16"):
        convert_to_fp16(fp16, [market_root], tmp_path / "again.onnx", agreement_images=4)


@pytest.mark.slow
def test_the_service_serves_the_fp16_file_with_exact_heatmaps(halved, tmp_path):
    fp32, fp16, _ = halved
    blobs = [image_bytes(pid, v) for pid in (1, 2) for v in (1, 2)]
    with ServiceProcess(fp32, tmp_path / "g.sqlite3", model_precision="fp16") as server, server.client() as client:
        model = client.get("/model").json()
        assert (model["file"], model["precision"], model["fingerprint"]) == ("model.fp16.onnx", "fp16", sha256_of(fp16))
        enrol(client, blobs)
        matches = query(client, blobs[0], top_k=4).json()["matches"]
    assert matches[0]["score"] == pytest.approx(1.0, abs=1e-5)
    for match in matches:
        assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-5)
