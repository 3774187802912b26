"""``python -m model_zoo import`` of plain ONNX embedding models: tiny networks exported from torch in the test
(the ops re-ID exports use: grouped convolutions, batch and instance norms, padding, pooling, a Gemm head with
batch norm and PReLU), imported, checked against ONNX Runtime on the source, the contract, RAM's identity and the
real service."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from model_zoo.contract import SOURCE_KEY, identity_error, open_cpu_session
from model_zoo.importers import Preprocessing, Provenance, import_model
from model_zoo.importers.openvino_ir import UnsupportedGraph
from tests.conftest import TINY_HEIGHT, TINY_WIDTH
from tests.server import assert_heatmaps_sum_to_scores

DIM = 12
MEAN, SCALE = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


class TinyEmbedder(nn.Module):
    """[B, 3, H, W] normalised BGR floats -> [B, DIM]: a trunk, global pooling, and the head the OMZ models have."""

    def __init__(self, head_activation: nn.Module = None, trunk_activation: nn.Module = None):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.ZeroPad2d((1, 0, 1, 0)),
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.InstanceNorm2d(16, affine=True),
            trunk_activation or nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False),
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 1),
            nn.ReLU6(),
        )
        self.fc = nn.Linear(24, DIM)
        self.bn = nn.BatchNorm1d(DIM)
        self.activation = head_activation or nn.PReLU(DIM)
        for module in self.modules():  # statistics away from the defaults, so folding them is tested
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1)
        return self.activation(self.bn(self.fc(pooled)))


def export(module: nn.Module, path, batch: int = 1):
    torch.manual_seed(0)
    module.eval()
    torch.onnx.export(
        module,
        torch.zeros(batch, 3, TINY_HEIGHT, TINY_WIDTH),
        str(path),
        input_names=["data"],
        output_names=["reid_embedding"],
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.fixture
def tiny_onnx(tmp_path):
    torch.manual_seed(0)
    return export(TinyEmbedder(), tmp_path / "tiny_embedder.onnx")


def test_an_imported_onnx_model_agrees_with_onnx_runtime_and_follows_the_contract(tiny_onnx, tmp_path):
    summary = import_model(
        tiny_onnx,
        tmp_path / "imported.onnx",
        Provenance(licence="MIT"),
        "bgr",
        preprocessing=Preprocessing(MEAN, SCALE),
    )
    assert max(summary["source_agreement"].values()) <= 1e-4  # the file's embedding = the source's, normalised
    session, contract = open_cpu_session(tmp_path / "imported.onnx")
    assert (contract.num_branches, contract.branch_dim, contract.feature_maps_kind) == (1, DIM, "attribution")
    images = np.random.default_rng(3).integers(0, 256, (4, TINY_HEIGHT, TINY_WIDTH, 3), np.uint8)
    embedding, maps = session.run(None, {"images": images})
    assert identity_error(embedding, maps) < 1e-5
    source = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "imported.onnx")).metadata_props}[SOURCE_KEY])
    assert source["format"] == "onnx" and source["preprocessing"] == {"mean": list(MEAN), "scale": list(SCALE)}


def test_the_preprocessing_given_is_the_preprocessing_applied(tiny_onnx, tmp_path):
    """Imported with the wrong mean, the file no longer agrees with the source fed the right one."""
    imported = tmp_path / "imported.onnx"
    import_model(tiny_onnx, imported, channel_order="bgr", preprocessing=Preprocessing(MEAN, SCALE))
    session, _ = open_cpu_session(imported)
    images = np.random.default_rng(4).integers(0, 256, (2, TINY_HEIGHT, TINY_WIDTH, 3), np.uint8)
    import onnxruntime as ort

    source = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for image, ours in zip(images, session.run(["embedding"], {"images": images})[0]):
        planar = image.transpose(2, 0, 1)[::-1][None].astype(np.float32)  # BGR
        normalised = (planar - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(SCALE, (1, 3, 1, 1))
        right = source.run(None, {"data": normalised.astype(np.float32)})[0]
        assert np.allclose(ours, right[0] / np.linalg.norm(right[0]), atol=1e-4)
        wrong = source.run(None, {"data": planar})[0]
        assert not np.allclose(ours, wrong[0] / np.linalg.norm(wrong[0]), atol=1e-2)


def test_an_op_outside_the_list_is_refused_by_name(tmp_path):
    path = export(TinyEmbedder(trunk_activation=nn.GELU()), tmp_path / "gelu.onnx")
    with pytest.raises(UnsupportedGraph, match="ONNX op Erf"):
        import_model(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_head_that_would_make_ram_inexact_is_refused(tmp_path):
    path = export(TinyEmbedder(head_activation=nn.Sigmoid()), tmp_path / "sigmoid_head.onnx")
    with pytest.raises(UnsupportedGraph, match="RAM would not be exact"):
        import_model(path, tmp_path / "out.onnx")


def test_the_service_serves_an_imported_onnx_model_with_exact_heatmaps(tiny_onnx, tmp_path):
    import_model(tiny_onnx, tmp_path / "imported.onnx", preprocessing=Preprocessing(MEAN, SCALE))
    assert_heatmaps_sum_to_scores(tmp_path / "imported.onnx", tmp_path / "g.sqlite3", "onnx", 1)
