"""CLPD (model_zoo/architectures/clpd.py, training/objectives/clpd.py): the attention modules, the concentration
losses and the SPR blocks against hand-computed cases (design 4.7), the contract maps with forced ties and mixed
strides, the two-step schedule's fixed learning rate, training to RAM heatmaps over HTTP, and its part attention
maps served beside them."""

import base64
import io
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from model_zoo.architectures import build_model
from model_zoo.architectures.clpd import (
    MultiscaleAttention,
    PartDescriptor,
    barycentre,
    relational,
    statistic,
    statistic_map,
)
from model_zoo.architectures.contract_maps import cosine_distance_map, grid_mean, weighted_map
from model_zoo.contract import OUTPUT_ATTENTION_MAPS, check_session
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, image_bytes, person_image, tiny_overrides
from harness.server import ServiceProcess, enrol, query
from tests.server import assert_heatmaps_sum_to_scores, onnx_outputs
from tests.test_web_page import ARTIFACTS, NEEDS_BROWSER, browser, query_on_page, strip_maps_drawn, wait_for  # noqa: F401 (browser: a fixture)
from training import export, load_config, train
from training.objectives.clpd import (
    activation_distribution_loss,
    activation_ratio_loss,
    candidate_counts,
    concentration_loss,
)
from training.solver import Phase, build_optimizer, set_learning_rate

TINY_CLPD = {
    "architecture": "clpd",
    "backbone": "mobilenetv2",
    "pretrained": None,
    "reduction_dim": 16,
    "clpd_middle_channels": 8,
}
IMAGES = torch.randint(
    0, 256, (3, TINY_HEIGHT, TINY_WIDTH, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
)


# The attention module -------------------------------------------------------------------------------------------
def test_attention_scales_are_channel_max_mean_and_three_convolutions_and_each_module_has_its_own_reduction():
    torch.manual_seed(0)
    attention = MultiscaleAttention(channels=3, parts=2).eval()
    x = torch.rand(2, 3, 5, 4)
    scales = attention.scales(x)
    assert scales.shape == (2, 2, 5, 5, 4)
    torch.testing.assert_close(scales[:, :, 0], x.amax(dim=1)[:, None].expand(2, 2, 5, 4))
    torch.testing.assert_close(scales[:, :, 1], x.mean(dim=1)[:, None].expand(2, 2, 5, 4))
    maps = attention(x)
    assert maps.shape == (2, 2, 5, 4) and ((maps > 0) & (maps < 1)).all()
    with torch.no_grad():
        for conv in attention.kernels:
            conv.weight.zero_()
            conv.bias.zero_()
        attention.reduce.weight.zero_()
        attention.reduce.bias.zero_()
        attention.reduce.weight[0, 0] = 1.0  # module 1: R_1x1 = [1, 0, 0, 0, 0]
        attention.reduce.weight[1, 1] = 1.0  # module 2: R_1x1 = [0, 1, 0, 0, 0]
    maps = attention(x)
    bn = attention.bn
    expected = torch.stack([x.amax(dim=1), x.mean(dim=1)], dim=1)
    torch.testing.assert_close(maps, torch.sigmoid(bn(expected)))


def test_single_scale_attention_is_one_convolution_per_module():
    model = build_model({**TINY_CLPD, "clpd_attention": "single"}, num_classes=5).train()
    assert model(IMAGES).aux["attention_maps"].shape == (3, 8, 4, 2)
    with pytest.raises(ValueError, match="clpd_attention"):
        build_model({**TINY_CLPD, "clpd_attention": "double"}, num_classes=5)


# The concentration losses ---------------------------------------------------------------------------------------
def test_activation_ratio_hand_case_and_its_gradient_is_eq_7():
    maps = torch.tensor([[[0.9, 0.8], [0.1, 0.1], [0.05, 0.05]]], requires_grad=True)
    loss = activation_ratio_loss(maps, 2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)  # S_K = 1.7, S = 2.0
    loss.sum().backward()
    expected = torch.full((3, 2), 0.425)  # S_K / S^2 off the candidates
    expected[0] = -0.075  # (S_K - S) / S^2 on them
    torch.testing.assert_close(maps.grad[0], expected)


def test_activation_distribution_hand_case_picks_the_outlier_and_moves_only_it():
    maps = torch.zeros(1, 3, 3)
    maps[0, 0, 0] = maps[0, 0, 1] = maps[0, 2, 2] = 1.0
    maps.requires_grad_()
    loss = activation_distribution_loss(maps, 3)
    # P = [(1 + sqrt 8) / 3, (1 + sqrt 5) / 3, (sqrt 8 + sqrt 5) / 3]: k* = the candidate at (2, 2)
    assert loss.item() == pytest.approx((math.sqrt(8) + math.sqrt(5)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(1.6881650, abs=1e-6)
    loss.sum().backward()
    expected = torch.zeros(3, 3)
    expected[2, 2] = (math.sqrt(8) + math.sqrt(5)) / 3
    torch.testing.assert_close(maps.grad[0], expected)


def test_candidate_counts_and_the_sum_over_modules():
    assert candidate_counts([0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.4, 0.4], 24 * 8) == [38, 38, 58, 58, 58, 58, 77, 77]
    assert candidate_counts([0.01], 8) == [1]
    maps = torch.rand(4, 2, 3, 3)
    ratio = concentration_loss(activation_ratio_loss, maps, [0.2, 0.4])  # K = 2 and 4 of 9 cells
    by_hand = (activation_ratio_loss(maps[:, 0], 2) + activation_ratio_loss(maps[:, 1], 4)).mean()
    torch.testing.assert_close(ratio, by_hand)


# The SPR blocks -------------------------------------------------------------------------------------------------
def test_statistics_hand_case_and_their_maps_average_to_them():
    z = torch.tensor([[1.0, 2.0], [3.0, 10.0]])[None]
    expected = {"max": 10.0, "min": 1.0, "mean": 4.0, "median": 2.0, "var": 12.5}
    for name, value in expected.items():
        assert statistic(z, name).item() == pytest.approx(value), name
        assert grid_mean(statistic_map(z, name)).item() == pytest.approx(value), name


def test_barycentre_hand_case_is_scale_free_and_its_map_averages_to_it():
    z = torch.zeros(1, 4, 3)
    z[0, 2, 1] = 0.7
    y, x = barycentre(z)
    assert (y.item(), x.item()) == pytest.approx((2 / 3, 1 / 2), abs=1e-5)
    assert [v.item() for v in barycentre(5 * z)] == pytest.approx([y.item(), x.item()], abs=1e-6)
    z = torch.rand(2, 3, 4, 3)
    y_hat = torch.linspace(0, 1, 4)[:, None].expand_as(z)
    torch.testing.assert_close(grid_mean(weighted_map(y_hat, z, 1e-6)), barycentre(z)[0])


def test_relational_distance_cases_and_an_all_zero_channel_gives_no_nan():
    others = torch.tensor([[1], [0]])  # two parts: each one's only other part
    z = torch.rand(2, 1, 3, 4, 4)
    same = relational(torch.cat([z, z], dim=1), others)
    assert same.shape == (2, 2, 1, 3)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)
    pair = torch.cat([z, torch.rand(2, 1, 3, 4, 4)], dim=1)
    torch.testing.assert_close(relational(pair, others)[:, 0], relational(pair, others)[:, 1])  # symmetric
    torch.testing.assert_close(
        relational(pair, others)[:, 0, 0], grid_mean(cosine_distance_map(pair[:, 0], pair[:, 1]))
    )
    disjoint = torch.zeros(1, 2, 1, 2, 2)
    disjoint[0, 0, 0, 0, :], disjoint[0, 1, 0, 1, :] = 1.0, 2.0
    assert (relational(disjoint, others) == 1).all()
    zero = disjoint.clone()
    zero[0, 0] = 0.0
    zero.requires_grad_()
    distance = relational(zero, others)
    distance.sum().backward()
    assert (distance == 1).all() and torch.isfinite(zero.grad).all()


def tied(z):
    """Forced ties: part 0's channel 0 constant, channel 1 zero on half the cells (min and median tie at 0)."""
    z = z.clone()
    z[:, 0, 0] = 0.5
    z[:, 0, 1].view(z.shape[0], -1)[:, ::2] = 0.0
    return z


@pytest.mark.parametrize("descriptor, blocks", [("SPR", 5 + 2 + 3), ("G", 1), ("GR", 1 + 3), ("SP", 5 + 2)])
def test_part_descriptor_maps_average_to_it_with_ties(descriptor, blocks):
    torch.manual_seed(0)
    head = PartDescriptor(channels=3, parts=4, dim=2, descriptor=descriptor)
    assert head.weight.shape == (4, 2, blocks, 3)
    z = tied(torch.rand(2, 4, 3, 5, 4))
    with torch.no_grad():
        torch.testing.assert_close(grid_mean(head.contract_map(z)), head(z), atol=1e-5, rtol=1e-5)
    margins = head.selection_margins(z)
    assert margins.shape == (2, 4)
    assert (margins[:, 0] == 0).all() if descriptor[0] == "S" else torch.isinf(margins).all()


def test_descriptor_names_are_checked():
    with pytest.raises(ValueError, match="clpd_descriptor"):
        PartDescriptor(3, 4, 2, "PR")


# The model ------------------------------------------------------------------------------------------------------
def test_the_global_branch_on_a_coarser_layer4_is_upsampled_and_the_identity_holds():
    torch.manual_seed(0)
    model = build_model({**TINY_CLPD, "last_stride": 2}, num_classes=5).eval()
    with torch.no_grad():
        out, reference = model(IMAGES), model.reference_descriptors(IMAGES)
    assert out.feature_maps.shape == (3, 2, 16, 4, 2) and out.aux["attention_maps"].shape == (3, 8, 4, 2)
    torch.testing.assert_close(out.feature_maps.mean(dim=(3, 4)), reference, atol=1e-5, rtol=1e-5)
    global_map = out.feature_maps[:, 0]
    assert torch.equal(global_map[..., 0::2, :], global_map[..., 1::2, :]) and torch.equal(
        global_map[..., 0], global_map[..., 1]
    )  # 2x1 -> 4x2


def test_the_ablation_knobs_and_the_dimensions():
    assert build_model({**TINY_CLPD, "clpd_descriptor": "G"}, num_classes=5).feature_maps_kind == "activations"
    assert build_model(TINY_CLPD, num_classes=5).feature_maps_kind == "attribution"
    with pytest.raises(ValueError, match="equal part descriptors"):
        build_model({**TINY_CLPD, "reduction_dim": 12}, num_classes=5)


def test_selection_margins_leave_the_global_branch_in_and_spread_each_part_over_its_channels():
    torch.manual_seed(0)
    model = build_model(TINY_CLPD, num_classes=5).eval()
    with torch.no_grad():
        margins = model.selection_margins(IMAGES)
    assert margins.shape == (3, 2, 16) and torch.isinf(margins[:, 0]).all()
    assert torch.equal(margins[:, 1, 0::2], margins[:, 1, 1::2])  # 8 parts of 2 channels


def clpd_cfg(root, out, **extra):
    values = {
        "model.architecture": "clpd",
        "model.reduction_dim": 16,
        "model.clpd_middle_channels": 8,
        "solver.optimizer": "sgd",
        "solver.lr": 0.01,
        "solver.phases": PHASES,
        **extra,
    }
    return load_config("base.yaml", tiny_overrides(root, out, **values))


PHASES = (
    "[{name: global, epochs: 1, trainable: [backbone, global], loss_weights: {loss_local: 0, loss_ratio: 0, "
    "loss_distribution: 0}},"
    " {name: joint, epochs: 1, fixed_lr: {backbone: 0.0002, global: 0.0002}, scheduler: multistep, milestones: [1]}]"
)


def test_step_one_runs_the_global_branch_alone_and_step_two_every_term(market_root, tmp_path):
    from training.engine import Trainer

    trainer = Trainer(clpd_cfg(market_root, tmp_path))
    images, targets = IMAGES, torch.tensor([0, 1, 2])
    trainer.enter_phase(0)
    out, total, terms = trainer.objective(images, targets)
    assert out.logits.shape[1] == 1 and set(terms) == {"loss_global"}
    total.backward()
    assert all(p.grad is None for p in trainer.model.descriptor.parameters())
    trainer.enter_phase(1)
    out, total, terms = trainer.objective(images, targets)
    assert out.logits.shape[1] == 2 and set(terms) == {"loss_global", "loss_local", "loss_ratio", "loss_distribution"}
    weights = trainer.objective.weights()
    assert (weights["loss_ratio"], weights["loss_distribution"]) == (0.1, 1.0)
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in terms.items()))


def test_a_fixed_rate_group_ignores_the_schedule():
    model = build_model(TINY_CLPD, num_classes=5)
    phase = Phase(
        "joint",
        150,
        optimizer="sgd",
        lr=5e-2,
        fixed_lr={"backbone": 2e-4, "global": 2e-4},
        scheduler="multistep",
        milestones=[50, 100],
    )
    optimizer = build_optimizer(model, phase)
    for epoch, local in ((0, 5e-2), (60, 5e-3), (120, 5e-4)):
        set_learning_rate(optimizer, phase.learning_rate(epoch, 0, 10))
        rates = {group["group"]: group["lr"] for group in optimizer.param_groups}
        assert rates == pytest.approx({"backbone": 2e-4, "global": 2e-4, "default": local})


def test_the_candidate_ratios_must_name_every_module(market_root, tmp_path):
    from training.objectives import build_objective

    cfg = clpd_cfg(market_root, tmp_path, **{"loss.clpd_candidate_ratios": "[0.2, 0.3]"})
    with pytest.raises(ValueError, match="clpd_candidate_ratios"):
        build_objective(cfg, build_model(TINY_CLPD, num_classes=5))


@pytest.fixture(scope="module")
def clpd_onnx(market_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clpd")
    summary = train(clpd_cfg(market_root, out, **{"solver.max_iters_per_epoch": 4, "data.erasing_prob": 0.5}))
    joint = summary["history"][-1]
    assert joint["phase"] == "joint" and all(
        math.isfinite(joint[k]) for k in ("loss_local", "loss_ratio", "loss_distribution")
    )
    export(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


def test_clpd_trains_in_two_steps_and_exports_with_attribution_parity_and_its_attention_maps(clpd_onnx):
    session = ort.InferenceSession(str(clpd_onnx), providers=["CPUExecutionProvider"])
    contract = check_session(session)
    assert contract.feature_maps_kind == "attribution" and contract.num_branches == 2 and contract.branch_dim == 16
    (attention,) = session.run([OUTPUT_ATTENTION_MAPS], {"images": IMAGES.numpy()})
    assert (
        attention.shape == (3, 8, contract.map_height, contract.map_width) and ((attention > 0) & (attention < 1)).all()
    )


def test_clpd_is_served_unchanged_with_heatmaps_that_average_to_the_score(clpd_onnx, tmp_path):
    assert_heatmaps_sum_to_scores(clpd_onnx, tmp_path / "gallery.sqlite3", "clpd", 2)


def test_the_part_attention_maps_come_beside_ram_for_the_query_and_each_match(clpd_onnx, tmp_path):
    blobs = [image_bytes(pid, v) for pid in (1, 2) for v in (1, 2)]
    with ServiceProcess(clpd_onnx, tmp_path / "g.sqlite3") as server, server.client() as client:
        model = client.get("/model").json()
        assert model["attention_maps"] is True and model["pair_head"] is False
        ids = enrol(client, blobs)
        body = query(client, blobs[0], top_k=4, overlays=True).json()
        without_heatmaps = query(client, blobs[0], top_k=4, heatmaps=False).json()
    (attention,) = onnx_outputs(clpd_onnx, blobs, [OUTPUT_ATTENTION_MAPS])
    expected = dict(zip(ids, attention))  # the query is the first gallery image
    np.testing.assert_allclose(body["query_heatmap"]["attention_grids"], attention[0], atol=1e-4)
    for match in body["matches"]:
        heatmap = match["heatmap"]
        np.testing.assert_allclose(heatmap["attention_grids"], expected[match["id"]], atol=1e-4)
        assert len(heatmap["attention_overlays_png"]) == len(attention[0]) == 8
        assert np.mean(heatmap["grid"]) == pytest.approx(match["score"], abs=1e-4)
    png = Image.open(io.BytesIO(base64.b64decode(body["matches"][0]["heatmap"]["attention_overlays_png"][0])))
    assert png.format == "PNG" and max(png.size) <= 256
    assert all(match["heatmap"] is None for match in without_heatmaps["matches"])


@NEEDS_BROWSER
def test_the_page_shows_the_part_attention_maps_beside_ram(browser, clpd_onnx, tmp_path):  # noqa: F811 (browser: the fixture)
    from selenium.webdriver.common.by import By

    image = tmp_path / "query.png"
    person_image(1, 1).save(image)
    with ServiceProcess(clpd_onnx, tmp_path / "g.sqlite3") as server, server.client() as client:
        enrol(client, [image_bytes(pid, v) for pid in (1, 2) for v in (1, 2)])
        cards = query_on_page(browser, server, image)
        assert not browser.find_element(By.ID, "pair-attention-label").is_displayed()  # no pair head for CLPD
        # each part's map drawn by the page from the answer's grids, over its image
        assert [len(card.find_elements(By.CSS_SELECTOR, ".strip.parts img.overlay")) for card in cards] == [8] * 4
        assert len(browser.find_elements(By.CSS_SELECTOR, "#query-card .strip.parts img.overlay")) == 8
        wait_for(browser, strip_maps_drawn)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "web_page_part_attention.png"))
