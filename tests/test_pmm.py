"""PMM (model_zoo/architectures/pmm.py, training/objectives/pmm.py): block ranking, A-Hard-Mix, negatives,
Grad-CAM detachment, the losses' hand cases, the contract maps, and training to RAM heatmaps over HTTP."""

import pytest
import torch

from model_zoo.architectures import build_model
from model_zoo.architectures.pmm import MaxStage
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
from tests.server import assert_heatmaps_sum_to_scores
from training import export, load_config, train
from training.losses import BatchHardTripletLoss, IdentificationLoss
from training.objectives.pmm import AttentiveMix, hard_mix, pick_negatives, top_block_mask

TINY_PMM = {"architecture": "pmm", "backbone": "mobilenetv2", "pretrained": None, "reduction_dim": 16}


def block_cam(sums):
    """A 6x4 map of 3x2 blocks whose block sums are ``sums`` (2x2)."""
    return torch.tensor(sums, dtype=torch.float32).div(6).repeat_interleave(3, 0).repeat_interleave(2, 1)[None]


def test_block_ranking_zeroes_the_top_k_blocks():
    cam = block_cam([[10, 2], [5, 7]])
    one, two = top_block_mask(cam, (3, 2), 1)[0, 0], top_block_mask(cam, (3, 2), 2)[0, 0]
    assert (one == 0).sum() == 6 and (one[:3, :2] == 0).all()
    assert (two == 0).sum() == 12 and (two[:3, :2] == 0).all() and (two[3:, 2:] == 0).all()
    tied = top_block_mask(block_cam([[1, 1], [1, 1]]), (3, 2), 1)[0, 0]
    assert (tied[:3, :2] == 0).all() and (tied == 0).sum() == 6  # ties: the lowest block index
    with pytest.raises(ValueError, match="does not split"):
        top_block_mask(cam, (4, 2), 1)


def test_hard_mix_takes_the_anchor_where_the_mask_is_one_and_the_negative_elsewhere():
    anchor, negative = torch.randn(2, 3, 4, 2, requires_grad=True), torch.randn(2, 3, 4, 2, requires_grad=True)
    ones = torch.ones(2, 1, 4, 2)
    assert torch.equal(hard_mix(anchor, negative, ones), anchor) and torch.equal(
        hard_mix(anchor, negative, 0 * ones), negative
    )
    mask = (torch.rand(2, 1, 4, 2) > 0.5).float()
    hard_mix(anchor, negative, mask).sum().backward()
    assert torch.equal(anchor.grad, mask.expand_as(anchor)) and torch.equal(
        negative.grad, (1 - mask).expand_as(negative)
    )


def test_negatives_are_always_another_person():
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):
        targets = torch.randperm(20, generator=generator)[:4].repeat_interleave(4)
        assert (targets[pick_negatives(targets)] != targets).all()
    with pytest.raises(ValueError, match="two people"):
        pick_negatives(torch.tensor([3, 3, 3]))


def tiny_batch():
    torch.manual_seed(0)
    model = build_model(TINY_PMM, num_classes=5).train()
    images = torch.randint(0, 256, (8, TINY_HEIGHT, TINY_WIDTH, 3), dtype=torch.uint8)
    return model, images, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def test_grad_cam_leaves_no_gradient_and_stage_two_sends_none_through_its_mask():
    model, images, targets = tiny_batch()
    out = model(images, AttentiveMix(targets, (1, 1), 3))
    assert all(p.grad is None for p in model.parameters())
    IdentificationLoss()(out.logits[:, 1:2], targets).backward()
    classifier = model.stage1.classifier.weight.grad
    assert classifier is None or not classifier.any()  # m_2 came from stage I's detached Grad-CAM
    assert model.stage2.linear.weight.grad.abs().sum() > 0


def test_stages_left_out_of_training_get_no_gradient_and_the_terms_are_stage_ones_alone():
    from training.objectives import build_objective

    model, images, targets = tiny_batch()
    overrides = [
        "model.architecture=pmm",
        "loss.mix=none",
        "loss.triplet_weight=1",
        "loss.triplet_margin=null",
        "loss.pmm_trained_stages=[1]",
    ]
    objective = build_objective(load_config(None, overrides), model)
    out, total, terms = objective(images, targets)
    stage_one = IdentificationLoss()(out.logits[:, :1], targets) + BatchHardTripletLoss(None)(
        out.aux["vectors"][:, :1], targets
    )
    torch.testing.assert_close(total, stage_one)
    total.backward()
    assert model.stage1.classifier.weight.grad.abs().sum() > 0 and model.trunk[0][0].weight.grad.abs().sum() > 0
    for untrained in (model.stage2, model.stage3, model.part):
        assert all(p.grad is None or not p.grad.any() for p in untrained.parameters())
    for stages in ([], [1, 1], [4]):
        with pytest.raises(ValueError, match="pmm_trained_stages"):
            build_objective(load_config(None, [*overrides[:-1], f"loss.pmm_trained_stages={stages}"]), model)


def test_classifiers_start_as_the_authors_kaiming_unless_a_small_std_is_asked_for():
    torch.manual_seed(0)
    authors = build_model(TINY_PMM, num_classes=400)
    small = build_model({**TINY_PMM, "classifier_init_std": 0.001}, num_classes=400)
    for stage in ("stage1", "stage2", "stage3"):
        kaiming, near_zero = getattr(authors, stage).classifier, getattr(small, stage).classifier
        assert abs(kaiming.weight.std().item() - (2 / 400) ** 0.5) < 0.005  # fan_out of a 16 -> 400 layer
        assert abs(near_zero.weight.std().item() - 0.001) < 2e-4 and not near_zero.bias.any()
    torch.testing.assert_close(small.stage2.linear.weight.std(), authors.stage2.linear.weight.std(), rtol=0.1, atol=0)


def test_bn_neck_feeds_the_classifiers_batch_normalised_u_and_leaves_u_and_the_maps_alone():
    torch.manual_seed(0)
    plain = build_model(TINY_PMM, num_classes=5)
    necked = build_model({**TINY_PMM, "bn_neck": True}, num_classes=5)
    assert set(necked.load_state_dict(plain.state_dict(), strict=False).missing_keys) == {
        f"stage{s}.neck.{key}" for s in (1, 2, 3) for key in ("weight", "bias", "running_mean", "running_var")
    }
    images = torch.randint(0, 256, (4, TINY_HEIGHT, TINY_WIDTH, 3), dtype=torch.uint8)
    out_plain, out_necked = plain.train()(images), necked.train()(images)
    torch.testing.assert_close(out_necked.aux["vectors"], out_plain.aux["vectors"])
    u = out_necked.aux["vectors"][:, 1]
    expected = (u - u.mean(0)) / torch.sqrt(
        u.var(0, unbiased=False) + 1e-5
    ) * necked.stage2.neck.weight + necked.stage2.neck.bias
    torch.testing.assert_close(out_necked.logits[:, 1], necked.stage2.classifier(expected), atol=1e-4, rtol=1e-4)
    groups = necked.parameter_groups()["classifiers"]
    assert necked.stage1.neck in groups and necked.stage3.classifier in groups
    with torch.no_grad():
        torch.testing.assert_close(necked.eval()(images).feature_maps, plain.eval()(images).feature_maps)


def test_eval_mode_does_not_mix_and_ignores_the_rest_of_the_batch():
    model, images, _ = tiny_batch()
    model.eval()
    with torch.no_grad():
        whole, alone = model(images).feature_maps, model(images[:1]).feature_maps
    torch.testing.assert_close(whole[:1], alone)


def test_max_stage_maps_average_to_its_vector_with_ties_and_gated_channels():
    torch.manual_seed(0)
    stage = MaxStage(6, 4, 3).eval()
    stage.bn.running_mean.normal_()
    x = torch.randn(2, 6, 4, 2)
    x[:, 0] = 0.5  # every cell ties for channel 0's maximum
    with torch.no_grad():
        stage.linear.bias[1] = -100.0  # a negative pre-activation: gated to 0
        maps, (u, _) = stage.contract_map(x), stage(x)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), u, atol=1e-5, rtol=0)
    assert (u[:, 1] == 0).all() and (maps[:, 1] == 0).all()


def test_soft_margin_batch_hard_triplet_and_label_smoothing_hand_cases():
    features = torch.tensor([0.0, 1.0, 3.0, 5.0]).view(4, 1, 1)
    loss = BatchHardTripletLoss(margin=None)(features, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(0.3150662, abs=1e-6)
    smoothed = IdentificationLoss(label_smoothing=0.1)
    assert smoothed(torch.zeros(1, 1, 3), torch.tensor([0])).item() == pytest.approx(1.0986123, abs=1e-6)
    assert smoothed(torch.tensor([[[2.0, 0.0, 0.0]]]), torch.tensor([0])).item() == pytest.approx(0.3728781, abs=1e-6)


def pmm_overrides(root, out, **extra):
    values = {
        "model.architecture": "pmm",
        "data.sampler": "pk",
        "data.num_instances": 2,
        "loss.triplet_weight": 1.0,
        "loss.triplet_margin": "null",
        "loss.label_smoothing": 0.1,
        "loss.mix_block": "[1,1]",
        "loss.mix_top_blocks": 2,
        **extra,
    }
    return tiny_overrides(root, out, **values)


@pytest.fixture(scope="module")
def pmm_onnx(market_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pmm")
    summary = train(load_config("base.yaml", pmm_overrides(market_root, out, **{"solver.max_iters_per_epoch": 4})))
    assert all(torch.isfinite(torch.tensor(h["loss_tri"])) for h in summary["history"])
    last = summary["history"][-1]  # each stage's training accuracy, beside their mean
    assert last["acc"] == pytest.approx(sum(last[f"acc_branch{s}"] for s in (1, 2, 3)) / 3)
    export(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


def test_pmm_trains_through_a_classifier_warm_up_and_exports_with_attribution_parity(pmm_onnx):
    import onnxruntime as ort

    from model_zoo.contract import check_session

    contract = check_session(ort.InferenceSession(str(pmm_onnx), providers=["CPUExecutionProvider"]))
    assert contract.feature_maps_kind == "attribution" and contract.num_branches == 3 and contract.branch_dim == 16


def test_selection_margins_leave_stage_one_in_and_follow_the_least_decided_channel():
    model, images, _ = tiny_batch()
    with torch.no_grad():
        margins = model.eval().selection_margins(images)
    assert margins.shape == (8, 3, 16) and torch.isinf(margins[:, 0]).all()
    assert (margins[:, 1] == margins[:, 1, :1]).all() and torch.equal(margins[:, 1], margins[:, 2])


def test_pmm_is_served_unchanged_with_heatmaps_that_average_to_the_score(pmm_onnx, tmp_path):
    assert_heatmaps_sum_to_scores(pmm_onnx, tmp_path / "gallery.sqlite3", "pmm", 3)
