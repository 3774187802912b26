"""Contract maps (model_zoo/architectures/contract_maps.py, design 0.2 rules R1-R9): each map averages over the
grid to the descriptor computed directly, and exports to ONNX; every registered architecture's maps average to
its reference descriptors; contract v1.1 (feature_maps_kind) and the exporter's parity rule for attribution maps."""

import warnings
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model_zoo.architectures  # noqa: F401  (registers every architecture)
from model_zoo.architectures import contract_maps as cm
from model_zoo.architectures.common import ReIDOutput, build_model
from model_zoo.contract import FEATURE_MAPS_KINDS, ContractError, ModelContract
from model_zoo.onnx_export import ExportParityError, check_parity, parity_images, write_onnx
from model_zoo.registry import ARCHITECTURE_REGISTRY
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
from training import load_config
from training.checkpoints import model_settings
from training.export import FlipAveraged, describe

B, D, H, W = 3, 5, 7, 4
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def maps():
    torch.manual_seed(0)
    return torch.randn(B, D, H, W, dtype=torch.float64)


def with_ties(maps):
    """Channel 0 constant (every cell ties); channel 1 with its max, its min and its lower median each twice."""
    maps = maps.clone()
    maps[:, 0] = 0.7
    flat = maps[:, 1].flatten(1)
    order = flat.argsort(dim=1)
    median = (H * W + 1) // 2 - 1
    for picked, copy in ((-1, -2), (0, 1), (median, median + 1)):
        flat.scatter_(1, order[:, [copy]], flat.gather(1, order[:, [picked]]))
    maps[:, 1] = flat.view(B, H, W)
    return maps


def assert_mean(result, descriptor):
    torch.testing.assert_close(cm.grid_mean(result), descriptor, **TOL)


# R1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(D, 3),
        nn.Linear(D, 3, bias=False),
        nn.Conv2d(D, 3, 1),
        nn.BatchNorm2d(D),
        nn.BatchNorm1d(D, affine=False),
    ],
)
def test_r1_affine_after_pooling(maps, module):
    module = module.double()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2)
        if module.affine:
            module.weight.data.normal_()
            module.bias.data.normal_()
    module.eval()
    pooled = cm.grid_mean(maps)
    direct = (
        module(pooled[:, :, None, None]).flatten(1)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
        else module(pooled)
    )
    assert_mean(cm.affine_map(maps, *cm.as_affine(module)), direct)


def test_r1_refuses_what_is_not_affine_per_cell():
    with pytest.raises(ValueError):
        cm.as_affine(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError):
        cm.as_affine(nn.BatchNorm2d(4).train())
    with pytest.raises(TypeError):
        cm.as_affine(nn.ReLU())


# R2 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_r2_stripes_average_like_adaptive_pooling(maps, parts):
    masks = cm.stripe_masks(H, W, parts)
    result = cm.region_map(maps[:, None], masks)  # [B, parts, D, h, w]
    assert_mean(result, F.adaptive_avg_pool2d(maps, (parts, 1)).squeeze(-1).transpose(1, 2))
    assert (result[:, 0, :, ~masks[0]] == 0).all()


def test_r2_blocks_average_like_adaptive_pooling(maps):
    result = cm.region_map(maps[:, None], cm.block_masks(H, W, 3, 2))
    assert_mean(result, F.adaptive_avg_pool2d(maps, (3, 2)).flatten(2).transpose(1, 2))
    one_block = torch.zeros(H, W, dtype=torch.bool)
    one_block[2:5, 1:3] = True
    assert_mean(cm.region_map(maps, one_block), maps[:, :, 2:5, 1:3].mean(dim=(2, 3)))


# R3, R5, R6 ------------------------------------------------------------------------------------------------------
def test_r3_weighted_pooling(maps):
    weights = torch.rand(B, H, W, dtype=maps.dtype)
    direct = (maps * weights[:, None]).sum(dim=(2, 3)) / weights.sum(dim=(1, 2))[:, None]
    assert_mean(cm.weighted_map(maps, weights), direct)
    per_channel = torch.rand(B, D, H, W, dtype=maps.dtype)
    assert_mean(cm.weighted_map(maps, per_channel), (maps * per_channel).sum(dim=(2, 3)) / per_channel.sum(dim=(2, 3)))


def test_r5_population_variance(maps):
    assert_mean(cm.variance_map(maps), maps.flatten(2).var(dim=2, unbiased=False))


def test_r6_cosine_distance(maps):
    other = torch.randn_like(maps)
    assert_mean(cm.cosine_distance_map(maps, other), 1 - F.cosine_similarity(maps.flatten(2), other.flatten(2), dim=2))


# R4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", cm.SELECTIONS)
def test_r4_selection_with_ties_split(maps, mode):
    maps = with_ties(maps)
    flat = maps.flatten(2)
    direct = {"max": flat.amax(2), "min": flat.amin(2), "median": flat.median(dim=2).values}[mode]
    result = cm.selection_map(maps, mode)
    assert_mean(result, direct)
    chosen = maps == direct[..., None, None]
    assert (result[~chosen] == 0).all()
    # a tie splits the value evenly: each of the c tied cells holds hw * v / c
    torch.testing.assert_close(result[:, 0], torch.full_like(result[:, 0], 0.7), **TOL)
    count = chosen[:, 1].flatten(1).sum(1)
    assert (count >= 2).all()
    torch.testing.assert_close(result[:, 1].flatten(1).abs().amax(1), (H * W * direct[:, 1] / count).abs(), **TOL)


def test_r4_selection_margin(maps):
    tied = with_ties(maps)
    margin = cm.selection_margin(tied, "max")
    assert (margin[:, :2] == 0).all() and (margin[:, 2:] > 0).all()
    assert (cm.selection_margin(tied, "median")[:, :2] == 0).all()
    ordered = maps.flatten(2).sort(dim=2).values
    scale = maps.abs().flatten(1).amax(1).clamp(min=1)[:, None]
    torch.testing.assert_close(cm.selection_margin(maps, "min"), (ordered[..., 1] - ordered[..., 0]) / scale)


# R7 ------------------------------------------------------------------------------------------------------------
def test_r7_relu_gate(maps):
    maps = maps.clone()
    maps[:, 0] = 0.0  # f == 0
    maps[:, 1] -= maps[:, 1].mean(dim=(1, 2), keepdim=True) + 0.5  # f < 0: gated off
    result = cm.relu_gate(maps)
    assert_mean(result, F.relu(cm.grid_mean(maps)))
    assert (result[:, 1] == 0).all()


@pytest.mark.parametrize("sigma", [torch.sigmoid, F.gelu, torch.tanh, lambda x: F.leaky_relu(x, 0.1), F.softplus])
def test_r7_any_nonlinearity(maps, sigma):
    maps = maps.clone()
    maps[:, 0] = 0.0  # f == 0: sigma(0) spreads over the grid, nothing divides by zero
    result = cm.nonlinearity_gate(maps, sigma)
    assert torch.isfinite(result).all()
    assert_mean(result, sigma(cm.grid_mean(maps)))


def test_r1_r7_decompose_an_mlp_head_layer_by_layer(maps):
    torch.manual_seed(1)
    first, second = nn.Linear(D, 8).double(), nn.Linear(8, 4).double()
    hidden = cm.relu_gate(cm.affine_map(maps, *cm.as_affine(first)))
    assert_mean(cm.affine_map(hidden, *cm.as_affine(second)), second(F.relu(first(cm.grid_mean(maps)))))


# R8, R9 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1, 2, (2, 3)])
def test_r8_nearest_upsampling_keeps_the_mean(maps, factor):
    result = cm.upsample_nearest(maps, factor)
    fy, fx = (factor, factor) if isinstance(factor, int) else factor
    assert result.shape[-2:] == (H * fy, W * fx)
    assert_mean(result, cm.grid_mean(maps))
    with pytest.raises(ValueError):
        cm.upsample_nearest(maps, 0)


def test_r9_concatenation(maps):
    coarse = torch.randn(B, 2, H // 2 + 1, W // 2, dtype=maps.dtype)
    result = cm.concat_maps([maps, cm.upsample_nearest(coarse, 2)[..., :H, :]])
    assert result.shape == (B, D + 2, H, W)
    assert_mean(result[:, :D], cm.grid_mean(maps))
    with pytest.raises(ValueError, match="one grid"):
        cm.concat_maps([maps, coarse])


# ONNX --------------------------------------------------------------------------------------------------------------
class EveryRule(nn.Module):
    """x [B, D, h, w] -> every rule's map, concatenated along D (R9)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(D, 3, 1)
        self.bn = nn.BatchNorm1d(D).eval()
        self.register_buffer("stripes", cm.stripe_masks(H, W, 2), persistent=False)

    def forward(self, x):
        weights = x[:, 0].sigmoid()
        return cm.concat_maps(
            [
                cm.affine_map(x, *cm.as_affine(self.conv)),
                cm.affine_map(x, *cm.as_affine(self.bn)),
                cm.region_map(x[:, None], self.stripes).flatten(1, 2),
                cm.weighted_map(x, weights),
                *(cm.selection_map(x, mode) for mode in cm.SELECTIONS),
                cm.variance_map(x),
                cm.cosine_distance_map(x, x.flip(1)),
                cm.relu_gate(x),
                cm.nonlinearity_gate(x, torch.sigmoid),
                cm.upsample_nearest(x, (2, 3))[..., :H, :W],
            ]
        )


def test_every_rule_exports_to_onnx_and_onnx_runtime_agrees(tmp_path):
    torch.manual_seed(2)
    model = EveryRule().eval()
    x = with_ties(torch.randn(B, D, H, W)).float()
    x[:, 2] = 0.0  # an all-zero channel: R7's f == 0 branch
    path = tmp_path / "rules.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["maps"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"x": {0: "batch"}, "maps": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    for batch in (x, x[:1]):
        (got,) = session.run(None, {"x": batch.numpy()})
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-5 * np.abs(expected).max(), rtol=0)


# Every registered architecture (C10) ------------------------------------------------------------------------------
TINY_MODEL = {
    "backbone": "mobilenetv2",
    "num_branches": 2,
    "reduction_dim": 16,
    "pretrained": None,
    "input_size": (TINY_HEIGHT, TINY_WIDTH),
}
IMAGES = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8))


def source_of(name: str, request) -> dict:
    """An imported architecture's source file: a tiny IR built with OpenVINO's API (tests/tiny_ir.py)."""
    return {"source": str(request.getfixturevalue("tiny_ir"))} if name.startswith("openvino_ir") else {}


@pytest.mark.parametrize("name", ARCHITECTURE_REGISTRY.names())
def test_every_architecture_maps_average_to_its_reference_descriptors(name, request):
    torch.manual_seed(0)
    model = build_model({**TINY_MODEL, **source_of(name, request), "architecture": name}, num_classes=5).eval()
    assert getattr(model, "feature_maps_kind", "activations") in FEATURE_MAPS_KINDS
    with torch.no_grad():
        maps = model(IMAGES).feature_maps
        reference = model.reference_descriptors(IMAGES)
    assert reference.shape == maps.shape[:3]
    torch.testing.assert_close(
        F.normalize(maps.float().mean((3, 4)), dim=2), F.normalize(reference.float(), dim=2), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip_averaged"])
@pytest.mark.parametrize("name", ARCHITECTURE_REGISTRY.names())
def test_every_architecture_exports_with_parity(name, flip, market_root, tmp_path, request):
    sources = {f"model.{key}": value for key, value in source_of(name, request).items()}
    cfg = load_config("base.yaml", tiny_overrides(market_root, tmp_path, **{"model.architecture": name}, **sources))
    model = build_model(model_settings(cfg), num_classes=5).eval()
    model = FlipAveraged(model).eval() if flip else model
    contract = describe(model, cfg, None)
    assert contract.feature_maps_kind == getattr(model, "feature_maps_kind", "activations")
    write_onnx(model, contract, tmp_path / "model.onnx")
    report = check_parity(model, tmp_path / "model.onnx", parity_images(TINY_HEIGHT, TINY_WIDTH, None))
    assert max(v for k, v in report.items() if k.endswith("_identity")) <= 1e-4


# Contract v1.1 and the attribution parity rule -------------------------------------------------------------------
def test_version_1_files_still_load_as_activations():
    contract = ModelContract("cama", "mobilenetv2", 3, 1280, 16, 8, 256, 128)
    metadata = {k: v for k, v in contract.to_metadata().items() if k != "reid.feature_maps_kind"}
    old = ModelContract.from_metadata({**metadata, "reid.contract_version": "1"})
    assert old.feature_maps_kind == "activations" and old.contract_version == "1"
    attribution = ModelContract("pmm", "resnet50", 3, 512, 24, 8, 384, 128, feature_maps_kind="attribution")
    assert ModelContract.from_metadata(attribution.to_metadata()) == attribution
    with pytest.raises(ContractError, match="version"):
        ModelContract.from_metadata({**metadata, "reid.contract_version": "2"})
    with pytest.raises(ContractError, match="feature_maps_kind"):
        ModelContract.from_metadata({**metadata, "reid.feature_maps_kind": "saliency"})


class ToyAttribution(nn.Module):
    """Two branches of R4 maps (GMP, and GMP mixed by a linear layer then ReLU-gated: R1 + R7). ``moved``: torch
    moves channel 0's spike of branch 0 by one column (as a near tie in the other runtime would); ``tied``: its
    ``selection_margins`` reports that channel as tied."""

    feature_maps_kind = "attribution"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.moved = self.tied = False

    def selected(self, images):
        return F.avg_pool2d(self.conv(images.permute(0, 3, 1, 2).float() / 255), 4)

    def forward(self, images):
        first = cm.selection_map(self.selected(images))
        second = cm.relu_gate(cm.affine_map(first, *cm.as_affine(self.mix)))
        if self.moved:
            first = torch.cat([first[:, :1].roll(1, dims=-1), first[:, 1:]], dim=1)
        return ReIDOutput(feature_maps=torch.stack([first, second], dim=1))

    def selection_margins(self, images):
        margin = cm.selection_margin(self.selected(images))
        if self.tied:
            margin[:, 0] = 0
        return torch.stack([margin, margin.amin(1, keepdim=True).expand_as(margin)], dim=1)


def test_attribution_parity_leaves_out_near_tied_channels_only(tmp_path):
    torch.manual_seed(3)
    model = ToyAttribution().eval()
    contract = ModelContract(
        "toy", "none", 2, 4, TINY_HEIGHT // 4, TINY_WIDTH // 4, TINY_HEIGHT, TINY_WIDTH, feature_maps_kind="attribution"
    )
    write_onnx(model, contract, tmp_path / "toy.onnx")
    images = parity_images(TINY_HEIGHT, TINY_WIDTH, None)
    report = check_parity(model, tmp_path / "toy.onnx", images)
    assert max(v for k, v in report.items() if k.endswith("_identity")) <= 1e-5
    model.moved = True  # the spike moved: same embedding, other maps
    with pytest.raises(ExportParityError, match="feature map"):
        check_parity(model, tmp_path / "toy.onnx", images)
    model.tied = True  # ... where the selection was a near tie: left out
    report = check_parity(model, tmp_path / "toy.onnx", images)
    assert report["random_batch7_channels_left_out"] >= 7
