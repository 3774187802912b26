"""CAMA on an imported IR (model_zoo/architectures/imported_cama.py), on the tiny Open Model Zoo-shaped IR."""

import json

import numpy as np
import pytest
import torch

from model_zoo.architectures import build_model
from model_zoo.importers.openvino_ir import IRHead, IRNetwork, UnsupportedGraph, ir_input, last_stage_start, read_ir
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
from training import load_config, train
from training.export import export_onnx

IMAGES = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8))


def tiny_cama(tiny_ir, **extra):
    cfg = {"architecture": "openvino_ir_cama", "source": str(tiny_ir), "num_branches": 3}
    return build_model({**cfg, "input_size": (TINY_HEIGHT, TINY_WIDTH), **extra}, num_classes=5)


def test_every_branch_starts_as_the_imported_model(tiny_ir):
    model = tiny_cama(tiny_ir).eval()
    with torch.no_grad():
        source = IRNetwork(read_ir(tiny_ir))(ir_input("bgr")(IMAGES)).reshape(len(IMAGES), 1, -1)
        maps = model(IMAGES).feature_maps
    assert maps.shape[1] == 3
    torch.testing.assert_close(maps.mean(dim=(3, 4)), source.expand(-1, 3, -1), atol=1e-5, rtol=0)


def test_the_branches_start_where_the_last_stage_does_and_a_layer_a_path_goes_around_is_refused(tiny_ir):
    graph = read_ir(tiny_ir)
    head = IRHead(graph)
    start = graph.layers[last_stage_start(graph, head.map_layer)]
    assert start.type == "GroupConvolution" and start.shapes[0][2:] != graph.layers[head.map_layer].shapes[0][2:]
    gate = next(layer.id for layer in graph.layers.values() if layer.type == "ReduceMean")
    with pytest.raises(UnsupportedGraph, match="not on every path"):
        IRNetwork(graph, start=gate)


@pytest.mark.parametrize("bn_neck", [False, True], ids=["no_neck", "bn_neck"])
def test_the_class_activation_maps_average_to_the_class_scores(tiny_ir, bn_neck):
    torch.manual_seed(0)
    model = tiny_cama(tiny_ir, bn_neck=bn_neck).train()
    for branch in model.branches:  # classifiers and necks away from their initial values
        for parameter in (*branch.classifier.parameters(), *branch.neck.parameters()):
            parameter.data.normal_()
    targets = torch.tensor([0, 3, 1, 3])
    out = model(IMAGES)
    maps = model.target_activation_maps(out.feature_maps, targets)
    scores = out.logits[torch.arange(len(targets)), :, targets]
    torch.testing.assert_close(maps.mean(dim=(2, 3)), scores, atol=1e-4, rtol=1e-4)


def test_omz_cama_trains_with_the_overlap_penalty_and_exports_with_exact_maps(market_root, tmp_path, tiny_ir):
    overrides = tiny_overrides(market_root, tmp_path, **{"model.source": tiny_ir, "model.num_branches": 3})
    train(load_config("omz_cama.yaml", overrides))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert all(np.isfinite(epoch["loss_oap"]) and epoch["loss_oap"] > 0 for epoch in history)
    export = export_onnx(tmp_path / "model.pt", tmp_path / "model.onnx")
    assert export["contract"]["reid.num_branches"] == "3"
    assert export["contract"]["reid.feature_maps_kind"] == "attribution"
    assert max(value for key, value in export["parity"].items() if key.endswith("_identity")) <= 1e-4
