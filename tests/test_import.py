"""``python -m model_zoo import``: tiny OpenVINO IRs built in the test with OpenVINO's own API, imported, and
checked against OpenVINO's runtime, the contract, RAM's identity and the real service."""

import json
import subprocess
import sys

import numpy as np
import onnx
import openvino as ov
import openvino.opset13 as ops
import pytest
import torch

from model_zoo.contract import SOURCE_KEY, identity_error
from model_zoo.importers import Provenance, import_model
from model_zoo.importers.openvino_ir import IRNetwork, UnsupportedGraph, read_ir
from tests.conftest import TINY_HEIGHT, TINY_WIDTH
from harness.server import REPO
from tests.server import assert_heatmaps_sum_to_scores
from tests.tiny_ir import DIM, omz_like_ir

HEIGHT, WIDTH = TINY_HEIGHT, TINY_WIDTH


@pytest.mark.parametrize("fp16", [False, True])
def test_the_interpreter_computes_what_openvino_computes(tmp_path, fp16):
    path = omz_like_ir(tmp_path / "tiny.xml", compress_to_fp16=fp16)
    x = np.random.default_rng(1).uniform(0, 255, (1, 3, HEIGHT, WIDTH)).astype(np.float32)
    core = ov.Core()
    expected = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    with torch.no_grad():
        ours = IRNetwork(read_ir(path))(torch.from_numpy(x)).numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_an_imported_ir_follows_the_contract_agrees_with_openvino_and_records_its_source(tmp_path):
    path = omz_like_ir(tmp_path / "tiny.xml", compress_to_fp16=True)
    summary = import_model(
        path, tmp_path / "tiny.onnx", Provenance(licence="Apache-2.0", url="https://example.org/tiny")
    )
    assert max(summary["source_agreement"].values()) <= 1e-4
    proto = onnx.load(str(tmp_path / "tiny.onnx"))
    metadata = {p.key: p.value for p in proto.metadata_props}
    source = json.loads(metadata[SOURCE_KEY])
    assert (
        source["licence"] == "Apache-2.0"
        and source["channel_order"] == "bgr"
        and set(source["files"]) == {"tiny.xml", "tiny.bin"}
    )
    assert (
        metadata["reid.feature_maps_kind"] == "attribution"
        and metadata["reid.num_branches"] == "1"
        and metadata["reid.branch_dim"] == str(DIM)
    )
    assert (metadata["reid.map_height"], metadata["reid.map_width"]) == (str(HEIGHT // 4), str(WIDTH // 4))


def test_the_per_cell_maps_are_the_linear_part_of_the_head(tmp_path):
    """Each cell's map is the head's linear part on that cell's share, plus one offset for every cell: moving
    one cell's activations moves that cell's map only (and the shared offset), never another cell's share."""
    model_path = omz_like_ir(tmp_path / "tiny.xml")
    from model_zoo.importers.openvino_ir import contract_model

    model = contract_model(read_ir(model_path), "bgr").eval()
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8))
    with torch.no_grad():
        out = model(images)
    maps = out.feature_maps.numpy()
    assert identity_error(out.embedding.numpy(), maps) <= 1e-5
    assert np.ptp(maps.reshape(3, DIM, -1), axis=2).max() > 1e-3  # not a constant grid: cells differ


def test_a_head_that_is_not_piecewise_linear_is_refused_by_name(tmp_path):
    path = omz_like_ir(tmp_path / "tiny.xml", head_tail=ops.sigmoid)
    with pytest.raises(UnsupportedGraph, match="Sigmoid .* not an affine or piecewise-linear"):
        import_model(path, tmp_path / "tiny.onnx")
    assert not (tmp_path / "tiny.onnx").exists()


def test_a_head_that_divides_by_its_data_is_refused(tmp_path):
    path = omz_like_ir(
        tmp_path / "tiny.xml", head_tail=lambda x: ops.divide(ops.constant(np.ones((1, DIM), np.float32)), x)
    )
    with pytest.raises(UnsupportedGraph, match="divides by the data"):
        import_model(path, tmp_path / "tiny.onnx")


def test_an_unknown_op_is_refused_by_name(tmp_path):
    path = omz_like_ir(tmp_path / "tiny.xml", before_pooling=lambda x: ops.add(x, ops.sin(x)))
    with pytest.raises(UnsupportedGraph, match="OpenVINO op Sin"):
        import_model(path, tmp_path / "tiny.onnx")


def test_the_command_line_imports_and_reports_errors_in_one_line(tmp_path):
    path = omz_like_ir(tmp_path / "tiny.xml")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_zoo",
            "import",
            str(path),
            str(tmp_path / "tiny.onnx"),
            "--licence",
            "Apache-2.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("\n{") :])  # after the parity check's lines
    assert summary["source"]["licence"] == "Apache-2.0"
    missing = subprocess.run(
        [sys.executable, "-m", "model_zoo", "import", str(tmp_path / "absent.xml"), str(tmp_path / "x.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1 and "absent.xml" in missing.stderr


@pytest.mark.slow
def test_the_service_serves_an_imported_model_with_exact_heatmaps(tmp_path):
    path = omz_like_ir(tmp_path / "tiny.xml", compress_to_fp16=True)
    import_model(path, tmp_path / "tiny.onnx")
    assert_heatmaps_sum_to_scores(tmp_path / "tiny.onnx", tmp_path / "gallery.sqlite", "openvino_ir", 1)


def torchreid_checkpoint(path, name="osnet_x0_25", ibn=False):
    """A torchreid-layout OSNet state dict with random weights and statistics, and a classifier as torchreid saves
    it."""
    from model_zoo.backbones.osnet import build_osnet

    torch.manual_seed(0)
    net = build_osnet(name, ibn=ibn)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    state = {**net.state_dict(), "classifier.weight": torch.zeros(7, 512), "classifier.bias": torch.zeros(7)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize(
    "name, ibn, expected",
    [
        ("osnet_x0_25", False, "osnet_x0_25"),
        ("osnet_x1_0", True, "osnet_ibn_x1_0"),
        ("osnet_ain_x0_5", False, "osnet_ain_x0_5"),
    ],
)
def test_a_torchreid_osnet_checkpoint_imports_with_its_own_embedding(tmp_path, name, ibn, expected):
    from model_zoo.importers.torchreid_osnet import contract_model

    path = torchreid_checkpoint(tmp_path / "osnet.pth", name, ibn)
    model, detected = contract_model(path)
    assert detected == expected
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 256, 128, 3), dtype=np.uint8))
    with torch.no_grad():
        out, reference = model(images), model.reference_descriptors(images)
    torch.testing.assert_close(out.embedding, torch.nn.functional.normalize(reference[:, 0], dim=1), atol=1e-5, rtol=0)
    summary = import_model(path, tmp_path / "osnet.onnx", Provenance(licence="MIT"), input_size=(128, 64))
    metadata = summary["contract"]
    assert (
        metadata["reid.architecture"] == "torchreid_osnet"
        and metadata["reid.branch_dim"] == "512"
        and metadata["reid.input_height"] == "128"
    )
    assert summary["source"]["channel_order"] == "rgb" and summary["source_agreement"] is None


def test_a_file_that_is_no_osnet_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchreid OSNet"):
        import_model(tmp_path / "other.pth", tmp_path / "x.onnx")
