"""``python -m training quantize`` on the tiny exported model: the int8 file beside it follows the contract
(identity included) and agrees with the fp32 file; the service serves it with REID_MODEL_PRECISION=int8, a
gallery re-embeds on the switch, and a missing int8 file refuses the start, saying how to write it."""

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_zoo.contract import (
    INPUT_IMAGES,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    PRECISION_KEY,
    QUANTIZATION_KEY,
    check_session,
    identity_error,
    precision_of,
    precision_path,
    split_branches,
)
from model_zoo.files import sha256_of
from model_zoo.preprocess import load_for_model
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, image_bytes
from harness.server import ServiceProcess, enrol, query
from tests.server import onnx_outputs
from training.quantize import float_nodes, quantize_model


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def quantized(tiny_model, market_root, tmp_path_factory):
    """(fp32 file, int8 file beside it, quantize summary): 24 of the 36 tiny training images calibrate, 12 measure."""
    fp32 = tmp_path_factory.mktemp("int8") / "model.onnx"
    shutil.copy(tiny_model[1], fp32)
    summary = quantize_model(fp32, [market_root], calibration_images=24, agreement_images=12)
    return fp32, precision_path(fp32, "int8"), summary


def test_quantize_writes_an_int8_file_beside_the_model_with_its_metadata(quantized):
    fp32, int8, summary = quantized
    assert (
        summary["output"] == str(int8) and int8.name == "model.int8.onnx" and summary["bytes"] < summary["fp32_bytes"]
    )
    contract = check_session(session(int8))
    assert contract == check_session(session(fp32))
    metadata, fp32_metadata = (
        session(int8).get_modelmeta().custom_metadata_map,
        session(fp32).get_modelmeta().custom_metadata_map,
    )
    assert (
        precision_of(metadata) == "int8"
        and precision_of(fp32_metadata) == "fp32"
        and PRECISION_KEY not in fp32_metadata
    )
    assert {k: v for k, v in metadata.items() if k not in (PRECISION_KEY, QUANTIZATION_KEY)} == {
        k: v for k, v in fp32_metadata.items() if k.startswith("reid.")
    }
    how = json.loads(metadata[QUANTIZATION_KEY])
    assert (how["format"], how["calibration_images"], how["calibration_data"], how["agreement"]["images"]) == (
        "QDQ",
        24,
        "market/bounding_box_train",
        12,
    )
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_pooling_normalisation_and_map_assembly_stay_float(quantized):
    fp32, int8, _ = quantized
    kept = float_nodes(onnx.load(str(fp32)).graph)
    by_name = {node.name: node.op_type for node in onnx.load(str(fp32)).graph.node}
    kinds = [by_name[name] for name in kept]
    assert {"ReduceMean", "ReduceL2", "Div", "Flatten", "Concat", "Unsqueeze"} <= set(kinds)
    assert (
        kinds.count("Conv") == 2
    )  # each branch's map-making node (here its reduction, batch norm folded in), and nothing before it
    # nothing is quantized between the maps and the outputs: no QuantizeLinear reads a tensor those nodes write
    graph = onnx.load(str(int8)).graph
    written = {output for node in graph.node if node.name in kept for output in node.output}
    assert not [node.name for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] in written]


def test_the_embedding_identity_holds_on_the_int8_file(quantized, market_root):
    _, int8, summary = quantized
    pixels = np.stack([load_for_model(p, TINY_HEIGHT, TINY_WIDTH) for p in sorted((market_root / "query").iterdir())])
    random = np.random.default_rng(1).integers(0, 256, (5, TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8)
    for batch in (pixels, pixels[:1], random):
        embedding, maps = session(int8).run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: batch})
        assert identity_error(embedding, maps) < 1e-5
    assert max(summary["identity"].values()) < 1e-5


def test_int8_embeddings_agree_with_fp32(quantized, market_root):
    fp32, int8, summary = quantized
    assert summary["quantization"]["agreement"]["mean_cosine"] > 0.98
    pixels = np.stack(
        [load_for_model(p, TINY_HEIGHT, TINY_WIDTH) for p in sorted((market_root / "bounding_box_test").iterdir())]
    )
    (reference,), (embedding,) = (
        session(path).run([OUTPUT_EMBEDDING], {INPUT_IMAGES: pixels}) for path in (fp32, int8)
    )
    scores = (
        (split_branches(reference, 2) * split_branches(embedding, 2)).sum(axis=2).mean(axis=1)
    )  # the retrieval score of the pair
    assert scores.mean() > 0.98 and scores.min() > 0.9


def test_quantize_refuses_what_it_cannot_do(quantized, market_root, tmp_path):
    fp32, int8, _ = quantized
    with pytest.raises(ValueError, match="already int8"):
        quantize_model(int8, [market_root], tmp_path / "again.onnx", calibration_images=4, agreement_images=4)
    with pytest.raises(ValueError, match="more than the 36 calibration images"):
        quantize_model(fp32, [market_root], tmp_path / "x.onnx", calibration_images=36)
    with pytest.raises(ValueError, match="would overwrite"):
        quantize_model(fp32, [market_root], fp32)
    with pytest.raises(FileNotFoundError):
        quantize_model(fp32, [tmp_path], tmp_path / "x.onnx")  # no bounding_box_train
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_the_service_serves_the_int8_file_and_re_embeds_a_gallery_on_the_switch(quantized, tmp_path):
    fp32, int8, _ = quantized
    store = tmp_path / "gallery.sqlite3"
    blobs = [image_bytes(pid, v) for pid in (1, 2) for v in (1, 2)]
    with ServiceProcess(fp32, store) as server, server.client() as client:
        ids = enrol(client, blobs)
        assert client.get("/model").json()["precision"] == "fp32"
    with ServiceProcess(fp32, store, model_precision="int8") as server, server.client() as client:
        model = client.get("/model").json()
        assert (model["file"], model["precision"], model["fingerprint"]) == ("model.int8.onnx", "int8", sha256_of(int8))
        matches = query(client, blobs[0], top_k=4).json()["matches"]
    # the stored embeddings were redone with the int8 file: every score is the int8 embeddings' own, which the
    # fp32 embeddings the gallery was enrolled with would miss
    scores = {}
    for path in (int8, fp32):
        embeddings = split_branches(onnx_outputs(path, blobs, [OUTPUT_EMBEDDING])[0], 2)
        scores[path] = [float((embeddings[0] * embeddings[ids.index(m["id"])]).sum(axis=1).mean()) for m in matches]
    assert len(matches) == 4 and [m["score"] for m in matches] == pytest.approx(scores[int8], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(scores[int8], scores[fp32])) > 1e-4
    for match in matches:
        assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-4)  # RAM's identity, served
    assert sqlite3.connect(store).execute("SELECT value FROM meta WHERE key = 'model_fingerprint'").fetchone()[
        0
    ] == sha256_of(int8)


@pytest.mark.slow
@pytest.mark.parametrize("precision, command", [("int8", "quantize"), ("fp16", "fp16")])
def test_a_missing_int8_or_fp16_file_refuses_the_start_naming_it_and_the_command(
    tiny_model, tmp_path, precision, command
):
    alone = tmp_path / "alone.onnx"
    shutil.copy(tiny_model[1], alone)
    message = (
        rf"REID_MODEL_PRECISION={precision} serves .*alone\.{precision}\.onnx, which does not exist"
        rf".*python -m training {command} .*alone\.onnx --data-root"
    )
    with pytest.raises(RuntimeError, match=message):
        ServiceProcess(alone, tmp_path / "g.sqlite3", model_precision=precision).start()


def test_ibn_blocks_and_everything_upstream_of_them_stay_float(market_root, tmp_path):
    """IBN-a (instance norm in MobileNetV2 blocks 1-10): the convolutions whose output is normalised per image,
    and every node upstream of them, stay float; the later blocks and the branches are quantized."""
    from model_zoo.architectures.common import build_model
    from training import load_config
    from training.checkpoints import model_settings
    from model_zoo.onnx_export import write_onnx
    from training.export import describe
    from training.quantize import normalised_upstream

    cfg = load_config(
        "base.yaml",
        [
            "model.pretrained=null",
            "model.ibn=true",
            "model.num_branches=2",
            f"data.height={TINY_HEIGHT}",
            f"data.width={TINY_WIDTH}",
        ],
    )
    model = build_model(model_settings(cfg), num_classes=5).eval()
    write_onnx(model, describe(model, cfg, None), tmp_path / "ibn.onnx")
    graph = onnx.load(str(tmp_path / "ibn.onnx")).graph
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    expected = {
        name
        for name in convs
        if any(f"/trunk.{block}/" in name for block in range(10))
        or name.startswith("/model/trunk/trunk.10/conv/conv.0/")
    }
    assert normalised_upstream(graph).intersection(convs) == expected and len(expected) < len(convs)
    summary = quantize_model(tmp_path / "ibn.onnx", [market_root], calibration_images=16, agreement_images=8)
    assert (
        summary["quantization"]["float_convolutions"] == f"{len(expected)} of {len(convs)}"
    )  # the same after ONNX Runtime's pre-processing
    assert max(summary["identity"].values()) < 1e-5


def test_an_imported_model_quantizes_with_its_identity_exact(tiny_ir, market_root, tmp_path, monkeypatch):
    """An imported IR's graph (reshapes by computed sizes, an FC head with a bias) through the same quantizer,
    which leaves nothing behind in the working folder (ORT's symbolic inference writes there when it stops)."""
    from model_zoo.importers import import_model

    fp32 = Path(import_model(tiny_ir, tmp_path / "imported.onnx")["output"])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    summary = quantize_model(fp32, [market_root], calibration_images=16, agreement_images=8)
    assert summary["identity"]["training_images"] <= 1e-4 and Path(summary["output"]).exists()
    assert list(work.iterdir()) == []
