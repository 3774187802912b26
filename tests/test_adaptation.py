"""Unsupervised adaptation (training/adaptation): clustering, memories, the loop, the exported file, and the
workflow a user runs: adapt on the running service's store, then serve the adapted file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model_zoo.files import sha256_of
from model_zoo.contract import identity_error, open_cpu_session
from model_zoo.onnx_export import ExportParityError, check_parity
from model_zoo.rerank import jaccard_distances, rerank_all_queries
from training.adaptation import ADAPTATION_KEY, HeadOnSource, adapt, add_evaluation
from training.adaptation.clustering import OUTLIER, cross_camera_mutual_neighbours, dbscan
from training.adaptation.crops import StoredCrop, read_crops
from training.adaptation.head import BranchLinearHead, append_head
from training.adaptation.loop import AdaptationSettings, adapt_head, embed
from training.adaptation.memory import CameraProxyMemory, ClusterMemory
from training.adaptation.views import crop_views
from training.evaluation import market_metrics

REPO = Path(__file__).resolve().parents[1]


def test_dbscan_finds_cores_borders_and_outliers():
    points = np.array([0.0, 0.1, 0.2, 0.5, 5.0, 5.1, 5.2, 9.0])
    distance = np.abs(points[:, None] - points[None])
    labels = dbscan(distance, eps=0.35, min_samples=3)
    # 0.5 is no core (two points within 0.35) but borders 0.2, a core: it joins; 9.0 is alone: an outlier
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, OUTLIER]
    assert (dbscan(distance, eps=0.35, min_samples=9) == OUTLIER).all()


def test_jaccard_distances_are_the_rerank_papers_with_lambda_zero():
    features = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    jaccard = jaccard_distances(features, k1=10, k2=3)
    assert np.allclose(jaccard[:6, 6:], rerank_all_queries(features[:6], features[6:], 10, 3, 0.0), atol=1e-6)
    assert np.allclose(np.diag(jaccard), 0) and np.allclose(jaccard, jaccard.T, atol=1e-6)


def test_crops_of_one_camera_take_the_one_camera_settings_where_none_was_set():
    from training.adaptation import _settings_for

    asked = AdaptationSettings(lr=5e-4, epochs=2, clusterer="mutual", memory="camera")
    resolved = _settings_for(["cam1"] * 3, asked)
    assert (resolved.clusterer, resolved.memory, resolved.lr, resolved.steps_per_epoch, resolved.epochs) == (
        "dbscan",
        "cluster",
        5e-4,
        20,
        2,
    )
    assert _settings_for(["cam1", "cam2"], asked) == asked


def test_mutual_neighbours_pair_each_person_across_cameras():
    rng = np.random.default_rng(1)
    people = rng.normal(size=(5, 16))
    camera_bias = rng.normal(size=16) * 0.3
    features = np.concatenate([people + 0.05 * rng.normal(size=people.shape), people + camera_bias])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels = cross_camera_mutual_neighbours(features, np.repeat([0, 1], 5))
    assert (labels[:5] == labels[5:]).all() and len(set(labels.tolist())) == 5


@pytest.mark.parametrize("memory", ["cluster", "camera"])
def test_memory_loss_prefers_the_true_cluster(memory):
    features = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 1, 2, 2]] + 0.1, dim=1)
    labels, cameras = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    if memory == "cluster":
        store = ClusterMemory(features, labels, temperature=0.05, momentum=0.2)
    else:
        store = CameraProxyMemory(features, labels, cameras, 0.05, 0.2, hard_negatives=2, inter_weight=0.5)
    right = store.loss(features, labels, cameras)
    wrong = store.loss(features, labels.roll(2), cameras)
    assert right < wrong
    store.update(features, labels, cameras)  # momentum update keeps unit vectors
    vectors = store.centroids if memory == "cluster" else store.proxies
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)


def synthetic_views(people=12, per_camera=3, cameras=2, dim=16, seed=0):
    """Pooled views [n, 2, 1, dim] of people seen by several cameras, each camera adding its own bias."""
    rng = np.random.default_rng(seed)
    identity = rng.normal(size=(people, dim))
    bias = rng.normal(size=(cameras, dim)) * 0.8
    rows, camera_ids, pids = [], [], []
    for p in range(people):
        for c in range(cameras):
            for _ in range(per_camera):
                base = identity[p] + bias[c]
                rows.append([base + 0.3 * rng.normal(size=dim), base + 0.3 * rng.normal(size=dim)])
                camera_ids.append(c)
                pids.append(p)
    views = np.array(rows, np.float32)[:, :, None, :]
    return views, np.array(camera_ids), np.array(pids)


@pytest.mark.parametrize("memory", ["cluster", "camera"])
@pytest.mark.parametrize("clusterer", ["dbscan", "mutual"])
def test_the_loop_forms_clusters_and_undoes_a_camera_bias(memory, clusterer):
    views, cameras, pids = synthetic_views(seed=1)
    settings = AdaptationSettings(
        epochs=4,
        memory=memory,
        clusterer=clusterer,
        min_samples=2,
        eps=0.5,
        k1=6,
        k2=3,
        steps_per_epoch=15,
        batch_size=16,
        lr=3e-3,
    )
    head, history = adapt_head(views, cameras, settings, progress=False)
    assert all(record.clusters >= 2 for record in history)
    if memory == "camera":  # the centroid memory's loss on these easy clusters is near 0 from the first step
        assert np.mean([r.loss_end for r in history]) < np.mean([r.loss_start for r in history])

    def cross_camera_map(features):
        q, g = cameras == 0, cameras == 1
        return market_metrics(features[q] @ features[g].T, pids[q], cameras[q], pids[g], cameras[g])["mAP"]

    before = cross_camera_map(embed(BranchLinearHead(1, views.shape[-1]), views[:, 0]))
    assert before < 0.9 and cross_camera_map(embed(head, views[:, 0])) > before + 0.05


def test_an_interrupted_adaptation_resumes_where_it_stopped(tmp_path):
    views, cameras, _ = synthetic_views()
    settings = AdaptationSettings(epochs=2, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=5, batch_size=16)
    checkpoint = tmp_path / "head.pt"
    adapt_head(views, cameras, settings, checkpoint, progress=False)
    longer = AdaptationSettings(**{**settings.__dict__, "epochs": 3})
    with pytest.raises(ValueError, match="another adaptation"):
        adapt_head(views, cameras, longer, checkpoint, progress=False)
    head, history = adapt_head(views, cameras, settings, checkpoint, progress=False)
    assert [r.epoch for r in history] == [1, 2]  # nothing left to do: the saved state is returned
    fresh, _ = adapt_head(views, cameras, settings, progress=False)
    assert np.allclose(embed(head, views[:, 0]), embed(fresh, views[:, 0]), atol=1e-6)


def test_an_identity_head_is_the_source_model(tiny_model):
    _, source = tiny_model
    session, contract = open_cpu_session(source)
    unchanged = append_head(onnx.load(str(source)), BranchLinearHead(contract.num_branches, contract.branch_dim))
    adapted, _ = open_cpu_session(unchanged.SerializeToString())
    images = np.random.default_rng(0).integers(0, 256, (3, contract.input_height, contract.input_width, 3), np.uint8)
    for before, after in zip(session.run(None, {"images": images}), adapted.run(None, {"images": images})):
        assert np.allclose(before, after, atol=1e-5)


def write_crops(folder: Path, people=range(8), per_camera=3) -> Path:
    from tests.conftest import person_image

    folder.mkdir(parents=True, exist_ok=True)
    for pid in people:
        for cam in (1, 2):
            for k in range(per_camera):
                person_image(pid, cam * 10 + k).save(folder / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg")
    return folder


def test_crops_are_decoded_a_batch_at_a_time_and_unreadable_ones_skipped(tiny_model, tmp_path):
    _, source = tiny_model
    session, contract = open_cpu_session(source)
    folder = write_crops(tmp_path / "crops", people=range(2), per_camera=2)
    (folder / "0009_c1s1_000000_00.jpg").write_bytes(b"not an image")
    crops = read_crops(str(folder))
    batches = list(crops.batches(contract.input_height, contract.input_width, batch_size=3))
    assert [len(b.pixels) + b.skipped for b in batches] == [3, 3, 3] and sum(b.skipped for b in batches) == 1
    views = crop_views(session, crops, contract.input_height, contract.input_width, progress=False)
    assert views.views.shape == (8, 2, contract.num_branches, contract.branch_dim) and views.skipped == 1
    assert views.camera_indices.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    fingerprint = crops.fingerprint()
    assert read_crops(str(folder)).fingerprint() == fingerprint
    changed = folder / "0000_c1s1_000000_00.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")  # one crop rewritten: its size and time change
    assert read_crops(str(folder)).fingerprint() != fingerprint  # a resumed run embeds again
    fingerprint = read_crops(str(folder)).fingerprint()
    write_crops(folder, people=range(3), per_camera=2)
    assert read_crops(str(folder)).fingerprint() != fingerprint  # new crops: the same


def test_a_stores_crops_are_listed_without_their_images_and_read_a_batch_at_a_time(tmp_path):
    """A million-item gallery is not held in memory: images are read per batch; one erased meanwhile is skipped."""
    from service.store import GalleryStore, NewItem
    from tests.conftest import TINY_HEIGHT, TINY_WIDTH, image_bytes

    store = GalleryStore(tmp_path / "g.sqlite3")
    try:
        items = [
            NewItem(image_bytes(pid, 0), "jpeg", 32, 64, np.zeros(8, np.float32), camera_id="c1") for pid in range(5)
        ]
        ids = [item.id for item in store.add(items)]
        crops = read_crops(str(store.path))
        assert all(isinstance(entry, StoredCrop) for entry, _ in crops.entries)
        fingerprint = crops.fingerprint()
        assert read_crops(str(store.path)).fingerprint() == fingerprint
        assert store.delete(ids[3])
        batches = list(crops.batches(TINY_HEIGHT, TINY_WIDTH, batch_size=2))
        assert [len(b.pixels) for b in batches] == [2, 1, 1] and [b.skipped for b in batches] == [0, 1, 0]
        assert read_crops(str(store.path)).fingerprint() != fingerprint
    finally:
        store.close()


def test_adapt_writes_a_contract_file_with_its_card_and_parity(tiny_model, tmp_path):
    _, source = tiny_model
    crops = write_crops(tmp_path / "crops")
    settings = AdaptationSettings(epochs=3, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=10, batch_size=16)
    out = tmp_path / "adapted.onnx"
    record = adapt(source, str(crops), out, tmp_path / "run", settings, progress=False)
    assert record["crops"] == 48 and record["cameras"] == 2 and record["clusters"] >= 2
    session, contract = open_cpu_session(out)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata[ADAPTATION_KEY])["source_sha256"] == record["source_sha256"]
    assert contract.evaluation == {} and contract.verification == {}
    pixels = read_crops(str(crops)).pixels(contract.input_height, contract.input_width, 5)
    embedding, maps = session.run(None, {"images": pixels[:5]})
    assert identity_error(embedding, maps) < 1e-5
    source_embedding = open_cpu_session(source)[0].run(["embedding"], {"images": pixels[:5]})[0]
    assert not np.allclose(embedding, source_embedding, atol=1e-3)  # the head moved
    card = out.with_suffix(".md").read_text()
    assert "clusters" in card and record["source_sha256"] in card
    assert (tmp_path / "run" / "head.pt").exists() and (tmp_path / "run" / "views.npz").exists()


def test_adapt_from_a_checkpoint_trains_the_whole_network_and_exports_a_contract_file(tiny_model, tmp_path):
    """--model model.pt: the network itself adapts on the clusters, and the export holds the contract: parity
    on the crops, the RAM identity, the adaptation record."""
    checkpoint, source = tiny_model
    crops = write_crops(tmp_path / "crops")
    settings = AdaptationSettings(epochs=2, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=6, batch_size=16)
    out = tmp_path / "adapted.onnx"
    record = adapt(checkpoint, str(crops), out, tmp_path / "run", settings, progress=False)
    assert record["crops"] == 48 and record["clusters"] >= 2 and record["trained"].startswith("its whole network")
    assert all(np.isfinite(e["loss"]) for e in record["epochs"]) and max(record["parity"].values()) < 1e-4
    session, contract = open_cpu_session(out)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata[ADAPTATION_KEY])["source_sha256"] == sha256_of(checkpoint)
    assert contract.evaluation == {} and contract.verification == {}
    pixels = read_crops(str(crops)).pixels(contract.input_height, contract.input_width, 5)
    embedding, maps = session.run(None, {"images": pixels})
    assert identity_error(embedding, maps) < 1e-5
    source_embedding = open_cpu_session(source)[0].run(["embedding"], {"images": pixels})[0]
    assert not np.allclose(embedding, source_embedding, atol=1e-3)  # the network moved
    assert "its whole network" in out.with_suffix(".md").read_text()
    assert (tmp_path / "run" / "adapted.pt").exists() and (tmp_path / "run" / "network.pt").exists()


def test_adapt_from_an_openvino_ir_trains_its_rebuilt_network(tiny_ir, market_root, tmp_path):
    """--model IR.xml (the shipped default's source ships beside it): the IR's rebuild adapts whole and exports
    as an imported file would, its record naming the IR's graph and weights; the source evaluates beside it."""
    from model_zoo.importers import import_model

    imported = import_model(tiny_ir, tmp_path / "imported.onnx")["output"]
    crops = write_crops(tmp_path / "crops")
    settings = AdaptationSettings(epochs=1, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=3, batch_size=16)
    out = tmp_path / "adapted.onnx"
    record = adapt(tiny_ir, str(crops), out, tmp_path / "run", settings, progress=False)
    assert record["source_model"] == tiny_ir.name and record["source_sha256"] == sha256_of(tiny_ir)
    assert record["source_weights_sha256"] == sha256_of(tiny_ir.with_suffix(".bin"))
    assert max(record["parity"].values()) < 1e-4
    session, contract = open_cpu_session(out)
    assert contract.feature_maps_kind == "attribution"
    pixels = read_crops(str(crops)).pixels(contract.input_height, contract.input_width, 5)
    embedding, maps = session.run(None, {"images": pixels})
    assert identity_error(embedding, maps) < 1e-5
    source_embedding = open_cpu_session(imported)[0].run(["embedding"], {"images": pixels})[0]
    assert not np.allclose(embedding, source_embedding, atol=1e-3)
    evaluated = add_evaluation(record, tiny_ir, out, [market_root], progress=False)["evaluation"]
    assert set(evaluated["source"]) == set(evaluated["adapted"]) == {market_root.name}


def test_oap_during_adaptation_takes_each_crops_cluster_centroid_as_its_classifier_row(tiny_model):
    """TrunkAdaptee.overlap: branch i's activation map is the centroid's branch-i slice dotted with each cell of
    F^i (the cell's share of the crop's score against its cluster), penalised as training's OAP; its gradient
    reaches the branches."""
    from training.adaptation.trunk import TrunkAdaptee
    from training.checkpoints import load_trained_model
    from training.data.transforms import TrainAugmentation
    from training.losses import OverlappedActivationPenalty

    network, cfg = load_trained_model(tiny_model[0])
    pixels = np.random.default_rng(0).integers(0, 256, (6, cfg.data.height, cfg.data.width, 3), np.uint8)
    oap = OverlappedActivationPenalty(cfg.loss.k, "ordered")
    adaptee = TrunkAdaptee(network, pixels, TrainAugmentation(flip_prob=0.5, padding=2), oap=oap)
    features = adaptee.batch_features(np.arange(6), np.random.default_rng(0))
    centroids = torch.randn(6, features.shape[1])
    maps = adaptee.batch_maps
    by_hand = torch.einsum("bndhw,bnd->bnhw", maps, centroids.view(6, maps.shape[1], -1))
    overlap = adaptee.overlap(centroids)
    assert torch.allclose(overlap, oap(by_hand))
    overlap.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.branches[1].parameters())


def test_oap_during_adaptation_changes_what_the_network_learns_and_is_refused_where_it_cannot_apply(
    tiny_model, tiny_ir, tmp_path
):
    checkpoint, source = tiny_model
    crops = str(write_crops(tmp_path / "crops"))
    common = dict(epochs=1, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=4, batch_size=16)
    outputs = {}
    for weight in (0.0, 5.0):
        out = outputs[weight] = tmp_path / f"oap{weight}.onnx"
        record = adapt(checkpoint, crops, out, None, AdaptationSettings(**common, oap_weight=weight), progress=False)
        assert record["settings"]["oap_weight"] == weight and max(record["parity"].values()) < 1e-4
    pixels = read_crops(crops).pixels(64, 32, 5)
    embeddings = [open_cpu_session(out)[0].run(["embedding"], {"images": pixels})[0] for out in outputs.values()]
    assert not np.allclose(*embeddings, atol=1e-4)
    with pytest.raises(ValueError, match="not a head"):
        adapt(source, crops, tmp_path / "h.onnx", settings=AdaptationSettings(oap_weight=1))
    with pytest.raises(ValueError, match="two branches or more"):
        adapt(tiny_ir, crops, tmp_path / "i.onnx", settings=AdaptationSettings(oap_weight=1))


def test_a_checkpoint_with_an_anchor_weight_is_refused_before_its_crops_are_read(tiny_model, tmp_path):
    checkpoint, _ = tiny_model
    with pytest.raises(ValueError, match="no anchor term"):
        adapt(
            checkpoint,
            str(tmp_path / "no such folder"),
            tmp_path / "o.onnx",
            settings=AdaptationSettings(anchor_weight=1),
        )


def test_evaluated_where_labels_exist_the_figures_go_into_the_file_and_the_card(tiny_model, market_root, tmp_path):
    _, source = tiny_model
    settings = AdaptationSettings(epochs=1, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=3, batch_size=16)
    out = tmp_path / "adapted.onnx"
    record = adapt(source, str(write_crops(tmp_path / "crops")), out, settings=settings, progress=False)
    record = add_evaluation(record, source, out, [market_root], progress=False)
    _, contract = open_cpu_session(out)
    assert contract.evaluation == record["evaluation"]["adapted"] and "market" in contract.evaluation
    assert "| market |" in out.with_suffix(".md").read_text()


def test_the_parity_check_catches_a_file_that_is_not_the_head(tiny_model, tmp_path):
    _, source = tiny_model
    session, contract = open_cpu_session(source)
    head = BranchLinearHead(contract.num_branches, contract.branch_dim)
    out = tmp_path / "a.onnx"
    onnx.save(append_head(onnx.load(str(source)), head), str(out))
    with torch.no_grad():
        head.weight.mul_(1.5).add_(0.1)
    images = {
        "random": np.random.default_rng(0).integers(
            0, 256, (7, contract.input_height, contract.input_width, 3), np.uint8
        )
    }
    with pytest.raises(ExportParityError):
        check_parity(HeadOnSource(session, head), out, images)


def test_adapt_refuses_a_quantized_source(tiny_model, tmp_path):
    _, source = tiny_model
    model = onnx.load(str(source))
    model.metadata_props.add(key="reid.precision", value="int8")
    int8 = tmp_path / "m.int8.onnx"
    onnx.save(model, str(int8))
    with pytest.raises(ValueError, match="not an fp32 file"):
        adapt(int8, str(write_crops(tmp_path / "c", people=range(2))), tmp_path / "o.onnx", progress=False)


def test_the_cli_names_a_bad_setting_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "adapt", str(tmp_path), str(tmp_path / "o.onnx"), "--set", "epoch=3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "unknown setting 'epoch'" in result.stderr


def test_adapt_on_the_running_services_store_then_serve_the_adapted_model(tiny_model, tmp_path):
    """The documented workflow: the service keeps running while adapt reads its store; restarted on the adapted
    file, it re-embeds the gallery and answers with the adapted model, heatmaps summing to scores."""
    from harness.server import ServiceProcess, enrol, query
    from tests.conftest import image_bytes
    from tests.server import onnx_outputs

    _, source = tiny_model
    store = tmp_path / "gallery.sqlite3"
    blobs = {cam: [image_bytes(pid, 10 * c + k) for pid in range(6) for k in range(2)] for c, cam in enumerate("ab")}
    out = tmp_path / "adapted.onnx"
    with ServiceProcess(source, store) as server, server.client() as client:
        for cam, images in blobs.items():
            enrol(client, images, camera_id=cam)
        settings = AdaptationSettings(epochs=2, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=5, batch_size=16)
        record = adapt(source, str(store), out, settings=settings, progress=False)
        assert record["crops"] == 24 and record["cameras"] == 2
        assert client.get("/healthz").status_code == 200
    with ServiceProcess(out, store) as server, server.client() as client:
        adaptation = client.get("/model").json()["adaptation"]
        assert adaptation["source_sha256"] == record["source_sha256"] and adaptation["crops"] == 24
        body = query(client, blobs["a"][0], top_k=3).json()
        assert body["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        for match in body["matches"]:
            assert np.mean(match["heatmap"]["grid"]) == pytest.approx(match["score"], abs=1e-4)
        (adapted_embedding,) = onnx_outputs(out, [blobs["a"][0]], ["embedding"])
        (source_embedding,) = onnx_outputs(source, [blobs["a"][0]], ["embedding"])
        assert not np.allclose(adapted_embedding, source_embedding, atol=1e-3)


def test_crops_come_from_the_clusters_postgresql_too(cluster_servers, tiny_model, tmp_path):
    from harness.server import ServiceProcess, enrol
    from tests.conftest import TINY_HEIGHT, TINY_WIDTH, image_bytes

    settings = cluster_servers.new_gallery()
    with ServiceProcess(tiny_model[1], tmp_path / "unused.sqlite3", **settings) as server, server.client() as client:
        enrol(client, [image_bytes(1, 0), image_bytes(2, 0)], camera_id="north")
        enrol(client, [image_bytes(1, 1)])
        crops = read_crops(settings["postgres_dsn"])
    (batch,) = crops.batches(TINY_HEIGHT, TINY_WIDTH)
    assert batch.pixels.shape == (3, TINY_HEIGHT, TINY_WIDTH, 3) and batch.skipped == 0
    assert batch.cameras == ["north", "north", ""]
