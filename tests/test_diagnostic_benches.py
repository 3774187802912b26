"""The diagnostic benches on real modules: bench/frozen_feature_heads.py (its heads are the architectures' own
modules, and only their classifiers learn, as in a warm-up), bench/loss_gradients.py (each term on each part),
bench/subnormal_weights.py and the model names bench/embed_speed.py writes."""

import torch

from tests.test_results_tables import bench_module


def test_every_head_learns_through_its_classifier_alone():
    heads = bench_module("frozen_feature_heads")
    generator = torch.Generator().manual_seed(0)
    people = torch.randn(6, 16, 2, 2, generator=generator)
    labels = torch.arange(6).repeat_interleave(4)
    maps = (people[labels] + 0.1 * torch.randn(24, 16, 2, 2, generator=generator)).relu().half()
    batches = [torch.randperm(24, generator=generator)[:12].tolist() for _ in range(40)]
    for name, build in heads.HEADS.items():
        module, classifier, logits_of = head = build(16, 6)
        assert logits_of(maps[:12].float()).shape == (12, 6), name
        classifier_ids = {id(p) for p in classifier.parameters()}
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        curve = heads.learn(
            head, maps, labels, batches, warmup=10, lr=1e-2, warmup_lr=1e-4, weight_decay=5e-4, report_every=20
        )
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {n for n, p in module.named_parameters() if id(p) in classifier_ids}, name
        assert [point["batches"] for point in curve] == [20, 40]
        assert curve[-1]["cross_entropy"] < curve[0]["cross_entropy"], name


def test_loss_gradients_reports_each_term_on_each_part(market_root, tmp_path):
    from tests.conftest import tiny_overrides
    from training import load_config
    from training.engine import Trainer

    trainer = Trainer(
        load_config(
            "base.yaml", tiny_overrides(market_root, tmp_path, **{"loss.triplet_weight": 1.0, "data.sampler": "pk"})
        )
    )
    gradients = bench_module("loss_gradients").term_gradients(trainer, batches=2)
    assert set(gradients) == {"loss_id", "loss_oap", "loss_tri"}
    assert all(set(by_part) == {"classifiers", "trunk", "rest", "all"} for by_part in gradients.values())
    assert (
        gradients["loss_tri"]["classifiers"] == 0 < gradients["loss_tri"]["trunk"]
    )  # the triplet never reaches a classifier
    assert gradients["loss_id"]["classifiers"] > 0 and gradients["loss_oap"]["trunk"] > 0


def test_embed_speed_names_a_model_in_the_runs_folder_as_a_result_file_may(tiny_model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("RUNS", str(tmp_path))
    model = tmp_path / "run" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(tiny_model[1], model)
    speeds = bench_module("embed_speed").measure([model], 1, rounds=1, seconds=0.05, batch_size=2)
    assert list(speeds) == ["$RUNS/run/model.onnx"]


def test_subnormal_weights_bench_counts_zeroes_and_times_both_files(tiny_model, tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(tiny_model[1]))
    convolution = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weights = numpy_helper.to_array(convolution).copy()
    weights.flat[:5] = np.float32(1e-40)
    convolution.CopyFrom(numpy_helper.from_array(weights, convolution.name))
    with_subnormals = tmp_path / "old_export.onnx"
    onnx.save(proto, str(with_subnormals))
    monkeypatch.setenv("RUNS", str(tmp_path))  # both files in the runs folder: timed under their $RUNS names
    figures = bench_module("subnormal_weights").compare(
        with_subnormals, [1], rounds=1, seconds=0.05, batch_size=2, work=tmp_path
    )
    assert figures["subnormal_weights"] == 5
    assert figures["max_embedding_difference"] < 1e-6
    speed = figures["images_per_second"][1]
    assert speed["as_is"] > 0 and speed["zeroed"] > 0 and speed["ratio_median"] > 0


def test_subnormal_weights_bench_times_a_training_step_as_is_and_zeroed(tiny_model):
    figures = bench_module("subnormal_weights").compare_training(
        tiny_model[0], threads=1, rounds=1, seconds=0.05, batch_size=4
    )
    assert figures["subnormal_values"] >= 0 and figures["ratio_median"] > 0
    assert len(figures["rounds"]["as_is"]) == len(figures["rounds"]["zeroed"]) == 1


def test_camera_centring_removes_each_cameras_offset_and_falls_back_to_all_fitted_crops():
    import numpy as np

    statistics = bench_module("adaptation").camera_statistics
    rng = np.random.default_rng(0)
    people = rng.normal(size=(6, 2 * 8))
    offsets = {1: 3 * rng.normal(size=16), 2: 3 * rng.normal(size=16)}
    cams = np.array([1] * 6 + [2] * 6 + [3])
    features = np.concatenate([people + offsets[1], people + offsets[2], people[:1] + offsets[2]])
    fitted = cams != 3

    centred = statistics(features, cams, fitted, num_branches=2, per_camera=True, standardise=False)
    assert np.allclose(np.linalg.norm(centred.reshape(13, 2, 8), axis=2), 1)
    assert (np.argmax(centred[:6] @ centred[6:12].T, axis=1) == np.arange(6)).all()
    everything = features[fitted].mean(axis=0)
    expected = (features[12] - everything).reshape(2, 8)
    assert np.allclose(centred[12].reshape(2, 8), expected / np.linalg.norm(expected, axis=1, keepdims=True))
    pooled = statistics(features, cams, fitted, num_branches=2, per_camera=False, standardise=False)
    assert np.allclose(pooled[12], centred[12])
    assert not np.allclose(pooled[:6], centred[:6])
