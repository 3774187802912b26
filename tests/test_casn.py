"""CASN (model_zoo/architectures/casn.py, training/objectives/casn.py): the pair sampler, the soft mask, the
identification attention, the Siamese indicator and closed-form attention, row alignment and the consistency
term, PCB's contract maps, training to RAM heatmaps over HTTP, the service's pairwise re-ranking stage, and
its cost bench (bench/pair_attention_cost.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_zoo.architectures import build_model
from tests.conftest import image_bytes, person_image, tiny_overrides
from harness.server import ServiceProcess, enrol, metric, query
from tests.server import assert_error, assert_heatmaps_sum_to_scores, onnx_outputs
from tests.test_web_page import ARTIFACTS, NEEDS_BROWSER, browser, query_on_page, strip_maps_drawn, wait_for  # noqa: F401 (browser: a fixture)
from training import export, load_config, train
from training.data import PairSampler
from training.engine import Trainer
from training.gradcam import grad_cam, linear_head_cam
from training.objectives.casn import aligned_profile, pair_indicator, soft_mask

TINY_CASN = {"architecture": "casn", "backbone": "mobilenetv2", "pretrained": None, "reduction_dim": 8}


def test_pairs_alternate_positives_and_negatives_in_the_asked_share():
    labels = [i // 3 for i in range(640)]
    sampler = PairSampler(labels, 32, torch.Generator().manual_seed(0), positive_share=0.5)
    same = []
    for batch in sampler:
        assert len(batch) == 32
        for a, b in zip(batch[0::2], batch[1::2]):
            assert a != b
            same.append(labels[a] == labels[b])
    assert 0.4 < sum(same) / len(same) < 0.6
    with pytest.raises(ValueError, match="even"):
        PairSampler(labels, 31, torch.Generator())
    with pytest.raises(ValueError, match="two images"):
        PairSampler(list(range(10)), 4, torch.Generator(), positive_share=0.5)


def test_soft_mask_hand_values():
    values = soft_mask(torch.tensor([0.5, 1.0, 0.0]), 10.0, 0.5)
    assert values.tolist() == pytest.approx([0.5, 0.9933071, 0.0066929], abs=1e-6)
    image = torch.randn(1, 3, 4, 2)
    assert torch.equal(image * (1 - torch.ones(1, 1, 4, 2)), torch.zeros_like(image))


def test_row_alignment_hand_case_and_shift_invariance():
    profile = torch.tensor([0, 0, 0.2, 1.0, 0.6, 0])
    aligned = aligned_profile(profile, 0.1, 6)
    assert aligned.tolist() == pytest.approx([0.2, 0.52, 0.84, 0.92, 0.76, 0.6], abs=1e-6)
    shifted = torch.tensor([0, 0, 0, 0.2, 1.0, 0.6])
    assert torch.linalg.vector_norm(aligned - aligned_profile(shifted, 0.1, 6)).item() == pytest.approx(0.0, abs=1e-7)
    assert aligned_profile(torch.zeros(6), 0.1, 6) is None


def test_the_indicator_of_a_linear_pair_head_is_the_sign_of_its_same_row():
    head = torch.nn.Linear(5, 2)
    difference = torch.randn(3, 5, requires_grad=True)
    a = pair_indicator(head(difference), difference)
    assert torch.equal(a, (head.weight[1] > 0).float().expand(3, 5)) and not a.requires_grad


def test_siamese_grad_cam_closed_form_equals_autograd():
    maps = torch.randn(2, 6, 4, 3).relu().requires_grad_()
    a = (torch.randn(6) > 0).float()
    score = (maps.mean(dim=(2, 3)) * a).sum()  # s_j = <a, f_j>, f = GAP(A)
    torch.testing.assert_close(
        grad_cam(score, maps), linear_head_cam(maps, a.expand(2, -1)).detach(), atol=1e-6, rtol=0
    )


def test_pair_cross_entropy_of_zero_logits_is_log_two():
    assert F.cross_entropy(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(math.log(2), abs=1e-7)


def batch(trainer, indices):
    images = np.stack([trainer.dataset.image(i) for i in indices])
    return torch.from_numpy(images), torch.from_numpy(trainer.dataset.labels[indices])


def casn_overrides(root, out, **extra):
    return tiny_overrides(
        root,
        out,
        **{
            "model.architecture": "casn",
            "model.reduction_dim": 8,
            "data.sampler": "pairs",
            "solver.warmup_epochs": 0,
            **extra,
        },
    )


@pytest.mark.parametrize("layout", ["ide", "pcb"])
def test_every_term_trains_and_a_negative_pair_adds_no_consistency(layout, market_root, tmp_path):
    trainer = Trainer(load_config("base.yaml", casn_overrides(market_root, tmp_path, **{"model.layout": layout})))
    model, objective = trainer.model.train(), trainer.objective
    images, targets = batch(trainer, [0, 1, 6, 30])
    assert targets[0] == targets[1] and targets[2] != targets[3]  # one positive pair, one negative
    out, total, terms = objective(images, targets)
    assert set(terms) == {"loss_ide", "loss_ia", "loss_pair", "loss_consistency"}
    assert 0 <= terms["loss_ia"].item() <= 1 and terms["loss_consistency"].item() >= 0
    total.backward()
    assert model.trunk[0][0].weight.grad.abs().sum() > 0 and model.pair_head[0].weight.grad.abs().sum() > 0

    negative_only = objective.consistency(
        out.aux["maps"][2:], torch.ones(1, out.aux["maps"].shape[1]), torch.tensor([False])
    )
    assert negative_only.item() == 0 and not negative_only.requires_grad


def test_identification_attention_reaches_the_backbone_through_the_mask(market_root, tmp_path):
    trainer = Trainer(load_config("base.yaml", casn_overrides(market_root, tmp_path)))
    objective = trainer.objective
    objective.set_phase_weights({"loss_ide": 0, "loss_pair": 0, "loss_consistency": 0})
    _, total, terms = objective(*batch(trainer, [0, 1, 2, 3]))
    assert set(terms) == {"loss_ia"}
    total.backward()
    assert trainer.model.trunk[0][0].weight.grad.abs().sum() > 0


def test_pcb_maps_average_to_each_stripe_descriptor_and_vanish_outside_the_stripe():
    torch.manual_seed(0)
    model = build_model({**TINY_CASN, "layout": "pcb"}, num_classes=5).eval()
    images = torch.randint(0, 256, (2, 96, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        maps = model(images).feature_maps
        reference = model.reference_descriptors(images)
    assert maps.shape == (2, 6, 8, 6, 2)
    torch.testing.assert_close(maps.mean(dim=(3, 4)), reference, atol=1e-6, rtol=0)
    for p in range(6):
        outside = [row for row in range(6) if row != p]
        assert not maps[:, p][:, :, outside].any()


def trained_casn_onnx(market_root, out, layout: str):
    # enough steps for the batch norm statistics to settle (see tiny_model): a barely trained net gives every image one
    # embedding, and the pairwise stage's min-max would then scale noise
    steps = {
        "solver.epochs": 8,
        "solver.max_iters_per_epoch": "null",
        "run.evaluate_at_end": "false",
        "model.layout": layout,
    }
    train(load_config("base.yaml", casn_overrides(market_root, out, **steps)))
    export(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


@pytest.fixture(scope="module")
def casn_onnx(market_root, tmp_path_factory):
    return trained_casn_onnx(market_root, tmp_path_factory.mktemp("casn"), "ide")


@pytest.fixture(scope="module")
def casn_pcb_onnx(market_root, tmp_path_factory):
    return trained_casn_onnx(market_root, tmp_path_factory.mktemp("casn_pcb"), "pcb")


def test_casn_is_served_unchanged_with_heatmaps_that_average_to_the_score(casn_onnx, tmp_path):
    assert_heatmaps_sum_to_scores(casn_onnx, tmp_path / "gallery.sqlite3", "casn", 1)


def test_the_artifact_indicator_equals_autograd_on_the_eval_mode_head():
    from model_zoo.pair_attention import PairHead

    torch.manual_seed(0)
    model = build_model(TINY_CASN, num_classes=5).eval()
    norm = model.pair_head[1]
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    head = model.pair_head_artifact("sha", 0.3)
    difference = torch.randn(7, 1280, requires_grad=True)
    expected = pair_indicator(model.pair_head(difference), difference)
    assert isinstance(head, PairHead) and np.array_equal(
        head.indicator(difference.detach().numpy()), expected.numpy() > 0
    )


@pytest.mark.parametrize("layout", ["ide", "pcb"])
def test_the_artifact_attention_maps_equal_the_training_objectives(layout):
    """The numpy closed form that re-ranks (features, indicator, stripe-pooled channel weights, M_q and M_g)
    against the torch objective's consistency maps on the same pair, on both layouts."""
    from training.gradcam import linear_head_cam

    torch.manual_seed(0)
    model = build_model({**TINY_CASN, "layout": layout}, num_classes=5).eval()
    head = model.pair_head_artifact("sha", 0.3)
    assert head.stripes == (1 if layout == "ide" else 6) and head.channels == 1280
    maps = torch.relu(torch.randn(2, 1280, 8, 4))  # a query and a gallery image's A, 8 rows: uneven stripe bins
    features = model.siamese_features(maps)
    np.testing.assert_allclose(head.features(maps.numpy()), features.numpy(), rtol=1e-5, atol=1e-6)
    difference = (features[:1] - features[1:]).requires_grad_(True)
    channel_weights = pair_indicator(model.pair_head(difference), difference).view(1, -1, 1280).sum(dim=1)
    expected = linear_head_cam(maps, channel_weights.expand(2, -1))
    query_attention, gallery_attention = head.attention_maps(
        features[0].numpy(), maps[0].numpy(), features[1:].numpy(), maps[1:].numpy()
    )
    assert expected.amax() > 0
    np.testing.assert_allclose(query_attention[0], expected[0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gallery_attention[0], expected[1].numpy(), rtol=1e-4, atol=1e-6)


def test_the_service_side_alignment_equals_the_training_side():
    from model_zoo.pair_attention import aligned_profile as service_profile

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        profile = torch.rand(8, generator=generator) * (torch.rand(8, generator=generator) > 0.3)
        trained = aligned_profile(profile, 0.3, 8)
        served = service_profile(profile.numpy(), 0.3, 8)
        assert np.allclose(served, np.zeros(8) if trained is None else trained.numpy(), atol=1e-6)


def test_fusion_with_one_attention_distance_ranks_by_features_alone():
    from model_zoo.pair_attention import fused_distances

    features = np.array([0.9, 0.1, 0.5, 0.3])
    assert np.array_equal(np.argsort(fused_distances(features, np.full(4, 0.7))), np.argsort(features))
    assert fused_distances(features, np.array([1.0, 0.0, 0.5, 0.2])).tolist() == pytest.approx([2.0, 0.0, 1.0, 0.45])


def test_export_writes_the_pair_head_bound_to_its_model_and_evaluation_uses_it(
    casn_onnx, market_root, tmp_path, capsys
):
    import shutil

    from model_zoo.pair_attention import PairHead, PairHeadMismatch, pair_head_path
    from training.cli import main

    artifact = pair_head_path(casn_onnx)
    assert PairHead.load(artifact, casn_onnx).weight.shape == (512, 1280)
    other = tmp_path / "other.onnx"
    shutil.copy(casn_onnx, other)
    other.write_bytes(other.read_bytes() + b"\0")
    with pytest.raises(PairHeadMismatch):
        PairHead.load(artifact, other)
    main(["evaluate", str(casn_onnx), "--data-root", str(market_root), "--pair-head", str(artifact), "--quiet"])
    assert "(features + pairwise attention)" in capsys.readouterr().out


# CASN's pairwise stage in the service ---------------------------------------------------------------------------
GALLERY = [(pid, v) for pid in (1, 2, 3) for v in (1, 2)]


def local_pair_ranking(model, query_blob, blobs):
    """The fused distances and pair maps computed here, from the ONNX model and its artifact, over ``blobs``."""
    from model_zoo.pair_attention import PairHead, pair_head_path

    head = PairHead.load(pair_head_path(model), model)
    embeddings, maps = onnx_outputs(
        model, [query_blob, *blobs], ["embedding", "feature_maps" if head.stripes == 1 else "pair_maps"]
    )
    maps = maps[:, 0] if head.stripes == 1 else maps  # A: IDE's one contract map, else the pair_maps output
    return head.rank(embeddings[0], maps[0], embeddings[1:], maps[1:])


@pytest.mark.parametrize("model", ["casn_onnx", "casn_pcb_onnx"])
def test_pair_attention_orders_the_shortlist_by_the_fused_distance_and_keeps_scores_plain(model, request, tmp_path):
    casn_onnx = request.getfixturevalue(model)
    blobs, query_blob = [image_bytes(*key) for key in GALLERY], image_bytes(1, 3)
    with ServiceProcess(casn_onnx, tmp_path / "g.sqlite3", max_heatmap_matches=3) as server, server.client() as client:
        assert client.get("/model").json()["pair_head"] is True
        ids = enrol(client, blobs)
        plain = query(client, query_blob, top_k=6, heatmaps=False).json()["matches"]
        body = query(client, query_blob, top_k=4, pair_attention=True, overlays=True).json()
        assert_error(query(client, query_blob, pair_attention=True, rerank=True), 422, "invalid_request")
        # asked again, the shortlist's maps all come from the cache (float16): no model call, no stored image decoded
        misses = 'reid_heatmap_map_cache_total{result="miss"}'
        before = metric(client, misses)
        again = query(client, query_blob, top_k=4, pair_attention=True).json()["matches"]
        assert metric(client, misses) == before
        assert [m["id"] for m in again] == [m["id"] for m in body["matches"]]
        # the pair term from float16 maps: 2.6e-3 off here, where RAM's grid mean stays within 1e-5 of the score
        assert [m["pair_distance"] for m in again] == pytest.approx(
            [m["pair_distance"] for m in body["matches"]], abs=5e-3
        )
    expected = local_pair_ranking(casn_onnx, query_blob, blobs)
    position = {item: row for row, item in enumerate(ids)}  # the shortlist is the whole gallery of 6
    matches = body["matches"]
    assert (
        body["reranked"] is True
        and "pair_attention" in body["timing_ms"]
        and [m["rank"] for m in matches] == [1, 2, 3, 4]
    )
    distances = [m["pair_distance"] for m in matches]
    assert distances == sorted(distances)
    for m in matches:
        row = position[m["id"]]
        assert m["pair_distance"] == pytest.approx(expected.distances[row], abs=1e-3)
        np.testing.assert_allclose(
            m["pair_attention"]["query_grid"], expected.query_attention[row], rtol=1e-3, atol=1e-6
        )
        np.testing.assert_allclose(
            m["pair_attention"]["gallery_grid"], expected.gallery_attention[row], rtol=1e-3, atol=1e-6
        )
    left_out = [expected.distances[position[i]] for i in ids if i not in {m["id"] for m in matches}]
    assert max(distances) <= min(left_out) + 1e-3
    plain_scores = {m["id"]: m["score"] for m in plain}
    for m in matches:  # score stays the plain cosine, and RAM still averages to it
        assert m["score"] == pytest.approx(plain_scores[m["id"]], abs=1e-5)
    for m in matches[:3]:
        assert np.mean(m["heatmap"]["grid"]) == pytest.approx(m["score"], abs=1e-4)
        assert m["pair_attention"]["query_overlay_png"] and m["pair_attention"]["gallery_overlay_png"]
    assert matches[3]["heatmap"] is None and matches[3]["pair_attention"]["gallery_overlay_png"] is None
    assert all("pair_distance" not in m and "pair_attention" not in m for m in plain)


def test_pair_attention_without_a_pair_head_is_409_and_a_wrong_or_missing_one_refuses_the_start(
    casn_onnx, casn_pcb_onnx, tiny_model, tmp_path
):
    import dataclasses
    import shutil

    from model_zoo.files import sha256_of
    from model_zoo.pair_attention import PairHead, pair_head_path

    bare = tmp_path / "bare.onnx"  # the same model file, without its artifact beside it
    shutil.copy(casn_onnx, bare)
    with ServiceProcess(bare, tmp_path / "g.sqlite3") as server, server.client() as client:
        assert client.get("/model").json()["pair_head"] is False
        enrol(client, [image_bytes(1, 1)])
        assert_error(query(client, image_bytes(1, 1), pair_attention=True), 409, "no_pair_head")
        assert query(client, image_bytes(1, 1)).status_code == 200
    stale = dataclasses.replace(PairHead.load(pair_head_path(casn_onnx)), model_sha256="0" * 64)
    stale.save(pair_head_path(bare))
    with pytest.raises(RuntimeError, match="belongs to another model file"):
        ServiceProcess(bare, tmp_path / "h.sqlite3").start()
    with pytest.raises(RuntimeError, match="REID_PAIR_HEAD_PATH=.*missing.npz: no such file"):
        ServiceProcess(casn_onnx, tmp_path / "i.sqlite3", pair_head_path=tmp_path / "missing.npz").start()
    with pytest.raises(
        RuntimeError, match="more than REID_MAX_QUEUED_IMAGES=50"
    ):  # a shortlist of 100 could never be queued
        ServiceProcess(casn_onnx, tmp_path / "j.sqlite3", max_queued_images=50, max_images_per_request=8).start()
    branches = tmp_path / "cama.onnx"  # two branches and no pair_maps: nothing of A to read
    shutil.copy(tiny_model[1], branches)
    dataclasses.replace(PairHead.load(pair_head_path(casn_pcb_onnx)), model_sha256=sha256_of(branches)).save(
        pair_head_path(branches)
    )
    with pytest.raises(RuntimeError, match="a pair head over 6 stripe.* this one's has none"):
        ServiceProcess(branches, tmp_path / "k.sqlite3").start()


def test_a_stripe_model_without_its_pair_head_is_not_asked_for_its_pair_maps(casn_pcb_onnx, tmp_path):
    import shutil

    from service.inference import InferenceModel
    from service.pair_ranking import load_pair_head
    from service.settings import Settings

    with_head = InferenceModel(casn_pcb_onnx, "cpu").load()
    images = np.zeros((2, *with_head.input_size, 3), np.uint8)
    assert load_pair_head(Settings(model_path=casn_pcb_onnx), with_head) is not None
    assert with_head.predict(images)[1].pair.shape[:2] == (2, 1280)
    bare = tmp_path / "bare.onnx"  # the same file, without its artifact beside it
    shutil.copy(casn_pcb_onnx, bare)
    without = InferenceModel(bare, "cpu").load()
    assert load_pair_head(Settings(model_path=bare), without) is None
    assert without.predict(images)[1].pair is None


def test_the_pair_attention_cost_bench_times_every_variant_with_and_without_cached_maps(casn_pcb_onnx, market_root):
    from tests.test_results_tables import bench_module

    gallery = [f.read_bytes() for f in sorted((market_root / "bounding_box_test").glob("*.jpg"))]
    queries = [f.read_bytes() for f in sorted((market_root / "query").glob("*.jpg"))[:2]]
    figures = bench_module("pair_attention_cost").one_model(casn_pcb_onnx, gallery, queries, rounds=1)
    assert set(figures) == {"no map cache", "maps cached"}
    for server in figures.values():
        assert len(server["latency_ms"]) == 6 and all(q["queries"] == 2 for q in server["latency_ms"].values())
        sizes = server["answer_kb_median"]  # the pair stage's answers carry each pair's maps M_q and M_g
        assert sizes["pair_attention, no heatmaps"] > sizes["k-reciprocal re-ranking, no heatmaps"]


@NEEDS_BROWSER
def test_the_page_shows_the_pair_attention_beside_ram(browser, casn_onnx, tmp_path):  # noqa: F811 (browser: the fixture)
    from selenium.webdriver.common.by import By

    image = tmp_path / "query.png"
    person_image(1, 3).save(image)
    with ServiceProcess(casn_onnx, tmp_path / "g.sqlite3", max_heatmap_matches=3) as server, server.client() as client:
        enrol(client, [image_bytes(*key) for key in GALLERY])
        cards = query_on_page(browser, server, image, "rerank", "pair-attention")  # the second box unticks the first
        assert not browser.find_element(By.ID, "rerank").is_selected()
        assert all("d_pair" in card.find_element(By.CSS_SELECTOR, "figcaption div").text for card in cards)
        # each map drawn by the page from the answer's grids, over its image
        assert [len(card.find_elements(By.CSS_SELECTOR, ".strip.pair img.overlay")) for card in cards] == [
            2
        ] * 6  # grids: every match
        wait_for(browser, strip_maps_drawn)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "web_page_pair_attention.png"))


def test_the_pool_schedule_warms_the_classifiers_up_without_the_attention_terms(market_root, tmp_path):
    # In the warm-up only the classifiers train: the trunk's maps carry no gradient, so the Grad-CAM terms
    # (identification attention, consistency) and the pair term are off there; the main phase has them all.
    cfg = load_config(
        "casn_pool.yaml",
        casn_overrides(
            market_root, tmp_path, **{"run.evaluate_at_end": "false", "model.ibn": "false", "data.source_weights": "{}"}
        ),
    )
    assert cfg.solver.phases[0]["loss_weights"] == {"loss_ia": 0, "loss_pair": 0, "loss_consistency": 0}
    train(cfg)
    assert (tmp_path / "model.pt").exists()
