"""FMN (model_zoo/architectures/fmn.py, training/objectives/fmn.py): the mask, the rank loss, the two phases,
the descriptor's ranking, and the whole route from training to RAM heatmaps over HTTP."""

import numpy as np
import pytest
import torch

from model_zoo.architectures import build_model
from model_zoo.architectures.fmn import MASK_LOGIT_CLAMP, FeatureMask
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
from tests.server import assert_heatmaps_sum_to_scores
from training import export, load_config, train
from training.checkpoints import model_settings
from training.engine import Trainer
from training.losses import ProbabilityMarginRankLoss

TINY_FMN = {
    "architecture": "fmn",
    "backbone": "mobilenetv2",
    "pretrained": None,
    "input_size": (TINY_HEIGHT, TINY_WIDTH),
}
PHASES = (
    "[{name: grn, epochs: 1, trainable: [grn], loss_weights: {loss_lan: 0, loss_rank: 0}},"
    " {name: mask_lan, epochs: 1, trainable: [mask, lan], eval_mode: [grn], loss_weights: {loss_grn: 0}}]"
)


def fmn_overrides(root, out, **extra):
    return tiny_overrides(
        root,
        out,
        **{
            "model.architecture": "fmn",
            "model.reduction_dim": "null",
            "solver.optimizer": "sgd",
            "solver.lr": 0.01,
            "solver.phases": PHASES,
            **extra,
        },
    )


def test_a_zero_mask_network_leaves_the_features_unmasked_and_any_mask_only_amplifies():
    mask = FeatureMask(8, (4, 2))
    torch.nn.init.zeros_(mask.linear.weight)
    m, clamped = mask(torch.randn(3, 8))
    assert m.shape == (3, 1, 4, 2) and torch.equal(m, torch.ones_like(m)) and clamped == 0
    torch.nn.init.normal_(mask.linear.weight, std=1.0)
    m, _ = mask(torch.randn(3, 8))
    assert (m >= 1).all()
    torch.nn.init.zeros_(mask.linear.weight)
    torch.nn.init.constant_(mask.linear.bias, 2 * MASK_LOGIT_CLAMP)
    m, clamped = mask(torch.randn(3, 8))
    assert clamped == 1 and torch.allclose(m, torch.full_like(m, float(np.exp(MASK_LOGIT_CLAMP))))


def probability_logits(p_true: float) -> torch.Tensor:
    """Two-class logits whose softmax gives p_true to class 0."""
    return torch.log(torch.tensor([[p_true, 1 - p_true]]))


@pytest.mark.parametrize("p_global, p_local, expected", [(0.6, 0.5, 0.2), (0.3, 0.5, 0.0)])
def test_rank_loss_hand_cases(p_global, p_local, expected):
    global_logits = probability_logits(p_global).requires_grad_()
    local_logits = probability_logits(p_local).requires_grad_()
    loss = ProbabilityMarginRankLoss(0.1)(global_logits, local_logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert global_logits.grad is None or not global_logits.grad.any()  # the GRN is frozen: p^G is a constant
    # d loss / d p^L is -1 when active: through the softmax, d p_t / d z_t = p_t (1 - p_t)
    active = expected > 0
    assert local_logits.grad[0, 0].item() == pytest.approx(-p_local * (1 - p_local) if active else 0.0, abs=1e-6)


def test_the_paper_descriptor_ranks_as_the_mean_of_branch_cosines():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    query, gallery = unit(rng.normal(size=(2, 16))), unit(rng.normal(size=(50, 2, 16)))
    cosines = (gallery * query).sum(-1)
    for alpha, weights in ((0.5, (0.5, 0.5)), (0.7, (0.49, 0.09))):
        descriptor = lambda f: np.concatenate([alpha * f[..., 0, :], (1 - alpha) * f[..., 1, :]], axis=-1)  # noqa: E731
        euclidean = np.linalg.norm(descriptor(gallery) - descriptor(query), axis=-1)
        assert np.array_equal(np.argsort(euclidean), np.argsort(-(cosines @ np.array(weights))))


def test_eval_maps_are_the_two_networks_last_stages():
    torch.manual_seed(0)
    model = build_model(TINY_FMN, num_classes=5).eval()
    images = torch.randint(0, 256, (2, TINY_HEIGHT, TINY_WIDTH, 3), dtype=torch.uint8)
    with torch.no_grad():
        maps = model(images).feature_maps
        _, global_map = model.global_branch(images)
    assert maps.shape == (2, 2, 1280, 4, 2)
    torch.testing.assert_close(maps[:, 0], global_map)
    assert model.lan[0] is not model.grn_global[0]  # the LAN is its own copy


def test_a_bn_neck_feeds_the_classifiers_batch_normalised_descriptors_and_leaves_the_maps_unchanged():
    torch.manual_seed(0)
    plain, necked = build_model(TINY_FMN, num_classes=5), build_model({**TINY_FMN, "bn_neck": True}, num_classes=5)
    missing, unexpected = necked.load_state_dict(plain.state_dict(), strict=False)
    assert {key.split(".")[0] for key in missing} == {"grn_neck", "lan_neck"} and not unexpected
    assert {necked.grn_neck, necked.lan_neck} <= set(necked.parameter_groups()["classifiers"])
    images = torch.randint(0, 256, (4, TINY_HEIGHT, TINY_WIDTH, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(necked.eval()(images).feature_maps, plain.eval()(images).feature_maps)
        out = necked.train()(images)
    gap = out.feature_maps.float().mean(dim=(3, 4))
    standardised = (gap - gap.mean(dim=0)) / torch.sqrt(gap.var(dim=0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out.logits[:, 0], necked.grn_classifier(standardised[:, 0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[:, 1], necked.lan_classifier(standardised[:, 1]), rtol=1e-4, atol=1e-4)


def test_phase_one_trains_the_grn_alone_and_phase_two_keeps_it_bit_identical(market_root, tmp_path):
    trainer = Trainer(load_config("base.yaml", fmn_overrides(market_root, tmp_path)))
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = trainer.train_epoch(0)
    assert set(record) >= {"loss_grn"} and "loss_lan" not in record and "loss_tri" not in record
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("grn_", "normalize")) for k in changed)

    after_grn = {k: v.clone() for k, v in model.state_dict().items()}
    record = trainer.train_epoch(1)
    assert {"loss_lan", "loss_rank"} <= set(record) and "loss_grn" not in record
    for key, value in model.state_dict().items():
        if key.startswith("grn_"):
            assert torch.equal(value, after_grn[key]), key
    assert not torch.equal(model.mask.linear.weight, after_grn["mask.linear.weight"])
    assert any(not torch.equal(v, after_grn[k]) for k, v in model.state_dict().items() if k.startswith("lan."))


@pytest.fixture(scope="module")
def fmn_onnx(market_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmn")
    train(
        load_config(
            "base.yaml",
            fmn_overrides(market_root, out, **{"solver.max_iters_per_epoch": 4, "run.evaluate_at_end": "false"}),
        )
    )
    export(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


def test_fmn_is_served_unchanged_with_heatmaps_that_average_to_the_score(fmn_onnx, tmp_path):
    assert_heatmaps_sum_to_scores(fmn_onnx, tmp_path / "gallery.sqlite3", "fmn", 2)


def test_an_untrained_lan_identical_to_its_grn_exports_to_a_file_onnx_runtime_loads(tmp_path):
    """The LAN starts as an ImageNet copy of the GRN: identical tensors once broke the exporter's constant folding."""
    import onnxruntime as ort

    from model_zoo.onnx_export import write_onnx
    from training.export import describe

    cfg = load_config(
        "base.yaml",
        [
            "model.architecture=fmn",
            "model.pretrained=null",
            "model.ibn=true",
            f"data.height={TINY_HEIGHT}",
            f"data.width={TINY_WIDTH}",
        ],
    )
    model = build_model(model_settings(cfg), num_classes=5).eval()
    model.lan.load_state_dict(model.grn_global.state_dict())
    write_onnx(model, describe(model, cfg, None), tmp_path / "fmn.onnx")
    ort.InferenceSession(str(tmp_path / "fmn.onnx"), providers=["CPUExecutionProvider"])
