"""End to end on tiny synthetic data: train, resume, evaluate, export with parity, read the contract back."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_zoo.contract import INPUT_IMAGES, OUTPUT_FEATURE_MAPS, ModelContract, check_session, split_branches
from model_zoo.provenance import data_fingerprint
from model_zoo.ram import ranking_activation_maps
from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
from training import evaluate, export, load_config, train
from training.checkpoints import load_trained_model
from training.engine import Trainer, cpu_has_native_bf16
from model_zoo.onnx_export import ExportParityError, check_parity, parity_images

SET = "market"  # the evaluation set's name: the tiny market folder's own name


@pytest.fixture(scope="module")
def trained_run(market_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(load_config("base.yaml", tiny_overrides(market_root, out)))
    return out, summary


def test_training_writes_a_run_folder_with_config_checkpoints_and_metrics(trained_run):
    out, summary = trained_run
    assert {"config.yaml", "last.pt", "model.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(h["loss_oap"] > 0 for h in metrics["history"])
    assert set(metrics["evaluation"]) == {SET}
    assert set(metrics["evaluation"][SET]) == {"all", "branch1", "branch2"}
    assert set(metrics["evaluation"][SET]["all"]) >= {"rank1", "rank5", "rank10", "mAP", "mINP"}
    # run.amp is on by default: bf16 autocast where the CPU has native bf16 (AVX512-BF16, AMX), else fp32
    assert metrics["precision"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert metrics["sources"] == {SET: {"images": 36, "identities": 6}}


def test_metrics_record_where_they_came_from_and_no_folder_of_this_machine(trained_run, market_root):
    """metrics.json is a result file (bench/results holds copies): commit, command, date, machine, data."""
    out, _ = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"commit", "command", "date", "machine"} <= set(metrics)
    assert {"cpu", "cpu_features", "cores", "load_average_1_5_15"} <= set(metrics["machine"])
    assert metrics["data"][SET] == data_fingerprint(market_root)
    assert metrics["config"]["data"]["roots"] == [market_root.name]
    assert "/" not in json.dumps(metrics["config"])


def test_warm_up_trains_only_the_classifiers_then_everything(market_root, tmp_path):
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_epoch(0)
    changed = {
        k
        for k, v in trainer.model.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k]) and "running" not in k
    }
    assert changed == {"branches.0.classifier.weight", "branches.1.classifier.weight"}
    trainer.train_epoch(1)
    for i in range(2):
        # stage keys keep the backbone's indices (features.14 -> stage.14)
        assert not torch.equal(
            trainer.model.branches[i].stage[0].conv[0][0].weight, before[f"branches.{i}.stage.14.conv.0.0.weight"]
        )


def test_gradients_of_the_objective_reach_every_branch(market_root, tmp_path):
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **{"model.num_branches": 3})))
    images = torch.from_numpy(np.stack([trainer.dataset.image(i) for i in range(8)]))
    targets = torch.from_numpy(trainer.dataset.labels[:8])
    out = trainer.model.train()(images)
    trainer.objective.oap(trainer.model.target_activation_maps(out.feature_maps, targets)).backward()
    for branch in trainer.model.branches:
        assert branch.stage[0].conv[0][0].weight.grad.abs().sum() > 0


def test_the_baseline_trains_without_oap(market_root, tmp_path):
    cfg = load_config(
        "base.yaml", tiny_overrides(market_root, tmp_path, **{"model.num_branches": 1, "run.evaluate_at_end": "false"})
    )
    trainer = Trainer(cfg)
    assert "loss_oap" not in trainer.objective.weights()
    summary = trainer.fit()
    assert all("loss_oap" not in h for h in summary["history"]) and all(
        np.isfinite(h["loss_id"]) for h in summary["history"]
    )


def test_resume_continues_where_the_checkpoint_stopped(market_root, trained_run, tmp_path):
    out, _ = trained_run
    cfg = load_config(
        "base.yaml", tiny_overrides(market_root, tmp_path, **{"solver.epochs": 2, "run.evaluate_at_end": "false"})
    )
    summary = train(cfg, resume=out / "last.pt")
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


@pytest.mark.parametrize("failing_step, resumed_epoch", [(3, 0), (7, 1)])
def test_a_run_interrupted_part_way_through_an_epoch_resumes_to_the_same_model(
    market_root, tmp_path, monkeypatch, failing_step, resumed_epoch
):
    """run.checkpoint_every_iters=3 with 4 batches per epoch: a checkpoint after batch 3 of the warm-up and of the
    main epoch. Interrupted in the 4th batch of either, the run resumes with the batches, augmentations, learning
    rates and optimizer state of the uninterrupted run: the same weights, the same epoch figures."""

    def config(out, **extra):
        return load_config(
            "base.yaml",
            tiny_overrides(
                market_root,
                out,
                **{"solver.max_iters_per_epoch": 4, "data.erasing_prob": 0.5, "run.evaluate_at_end": "false", **extra},
            ),
        )

    whole = Trainer(config(tmp_path / "whole"))
    whole.fit()
    interrupted = Trainer(config(tmp_path / "part", **{"run.checkpoint_every_iters": 3}))
    step, calls = interrupted._step, []

    def step_until_the_power_fails(images, targets):
        if len(calls) == failing_step:
            raise KeyboardInterrupt
        calls.append(1)
        return step(images, targets)

    monkeypatch.setattr(interrupted, "_step", step_until_the_power_fails)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = Trainer(config(tmp_path / "part", **{"run.checkpoint_every_iters": 3}))
    resumed.resume(tmp_path / "part" / "last.pt")
    assert (resumed.start_epoch, resumed.partial_epoch["iteration"]) == (resumed_epoch, 3)
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history])


def test_evaluate_a_checkpoint(trained_run, market_root):
    out, summary = trained_run
    results = evaluate(out / "model.pt", progress=False)
    assert results[SET]["all"]["mAP"] == pytest.approx(summary["evaluation"][SET]["all"]["mAP"], abs=1e-6)


def test_export_follows_the_contract_and_agrees_with_pytorch(trained_run, market_root, tmp_path):
    out, summary = trained_run
    report = export(out / "model.pt", tmp_path / "model.onnx")
    assert max(v for k, v in report["parity"].items() if k.endswith("embedding")) <= 1e-4
    assert {k.split("_batch")[0] for k in report["parity"]} == {"random", "real"}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    contract = check_session(session)
    assert (contract.num_branches, contract.branch_dim, contract.map_height, contract.map_width) == (2, 16, 4, 2)
    assert (contract.input_height, contract.input_width) == (TINY_HEIGHT, TINY_WIDTH)
    assert contract.evaluation[SET]["all"]["mAP"] == pytest.approx(summary["evaluation"][SET]["all"]["mAP"])
    assert contract.config["model"]["num_branches"] == 2
    assert contract.config["data"]["roots"] == [market_root.name] and "/" not in json.dumps(
        contract.config
    )  # no path of this machine
    images = parity_images(TINY_HEIGHT, TINY_WIDTH, market_root / "query", count=3)["real"]
    embedding, maps = session.run(None, {INPUT_IMAGES: images})
    # RAM of a real exported model: grid mean == retrieval score (mean over branches of cosines)
    score = float(embedding[0] @ embedding[1]) / contract.num_branches
    ram = ranking_activation_maps(split_branches(embedding[0], contract.num_branches), maps[1])
    assert ram.score == pytest.approx(score, abs=1e-5)


def test_a_flip_averaged_export_embeds_an_image_and_its_mirror_alike_and_keeps_the_identity(
    trained_run, market_root, tmp_path
):
    from model_zoo.contract import FLIP_KEY, identity_error

    out, _ = trained_run
    export(out / "model.pt", tmp_path / "plain.onnx")
    report = export(out / "model.pt", tmp_path / "flip.onnx", flip=True)
    assert max(v for k, v in report["parity"].items() if k.endswith("embedding")) <= 1e-4
    plain, flip = (
        ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for name in ("plain", "flip")
    )
    assert flip.get_modelmeta().custom_metadata_map[FLIP_KEY] == "true" and check_session(flip).evaluation == {}
    images = parity_images(TINY_HEIGHT, TINY_WIDTH, market_root / "query", count=3)["real"]
    embedding, maps = flip.run(None, {INPUT_IMAGES: images})
    mirrored, _ = flip.run(None, {INPUT_IMAGES: np.ascontiguousarray(images[:, :, ::-1])})
    assert np.abs(embedding - mirrored).max() < 1e-5 and identity_error(embedding, maps) < 1e-5
    (plain_maps,), (mirror_maps,) = (
        plain.run([OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: x}) for x in (images, np.ascontiguousarray(images[:, :, ::-1]))
    )
    assert np.abs(maps - (plain_maps + mirror_maps[..., ::-1]) / 2).max() < 1e-4  # the two passes' maps, averaged


def test_the_exported_file_evaluates_like_its_checkpoint(trained_run, market_root, tmp_path):
    import onnxruntime as ort

    from training.evaluation import branch_features, load_test_split, onnx_branch_features

    out, _ = trained_run
    export(out / "model.pt", tmp_path / "model.onnx")
    model, _ = load_trained_model(out / "model.pt")
    query_images, *_ = load_test_split(market_root, TINY_HEIGHT, TINY_WIDTH, progress=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        onnx_branch_features(session, query_images, 2, progress=False),
        branch_features(model, query_images, progress=False),
        atol=1e-5,
    )
    # The barely trained model's scores nearly tie, so rankings (and mAP) may differ by float noise: only
    # the route is checked here; on real models the figures agree (the model card lists both).
    assert set(evaluate(tmp_path / "model.onnx", [market_root], progress=False)[SET]) == {"all", "branch1", "branch2"}


@pytest.mark.parametrize("shift", [1.0, float("nan")])  # NaN: every difference is NaN, which compares below any bound
def test_a_parity_failure_is_reported(trained_run, tmp_path, shift):
    out, _ = trained_run
    export(out / "model.pt", tmp_path / "model.onnx", real_images=None)
    model, _ = load_trained_model(out / "model.pt")
    with torch.no_grad():
        model.branches[0].bn.bias.add_(shift)
    with pytest.raises(ExportParityError):
        check_parity(model, tmp_path / "model.onnx", parity_images(TINY_HEIGHT, TINY_WIDTH, None))


def test_an_embedding_slices_parity_bound_grows_with_its_branchs_conditioning():
    from model_zoo.onnx_export import CONDITIONING_REFERENCE, EMBEDDING_TOLERANCE, embedding_bounds

    maps = np.ones((1, 2, 4, 2, 2), np.float32)  # branch 1: every cell its mean, max|F| / |mean F| = 0.5
    maps[0, 1] = -2.0
    maps[0, 1, :, 0, 0] = 7.0  # branch 2: mean 0.25 a channel, so |mean F| = 0.5 against a peak of 7
    np.testing.assert_allclose(
        embedding_bounds(maps), [[EMBEDDING_TOLERANCE, EMBEDDING_TOLERANCE * 14 / CONDITIONING_REFERENCE]]
    )


def test_contract_metadata_round_trips():
    contract = ModelContract(
        "cama", "mobilenetv2", 3, 1280, 16, 8, 256, 128, "data", {"cuhk03": {"all": {"mAP": 0.5}}}, {"a": 1}
    )
    assert ModelContract.from_metadata(contract.to_metadata()) == contract
    assert contract.embedding_dim == 3840


def test_bf16_is_used_only_where_the_cpu_has_it_natively(tmp_path):
    from training.engine import autocast_dtype, cpu_has_native_bf16

    (tmp_path / "avx512").write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    (tmp_path / "bf16").write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    (tmp_path / "amx").write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert [cpu_has_native_bf16(tmp_path / name) for name in ("avx512", "bf16", "amx", "missing")] == [
        False,
        True,
        True,
        False,
    ]
    assert autocast_dtype(torch.device("cpu"), amp=False) is None
    assert autocast_dtype(torch.device("cuda"), amp=True) == torch.float16
    assert autocast_dtype(torch.device("cpu"), amp=True, force_cpu_bf16=True) == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), amp=False, force_cpu_bf16=True) is None


def test_the_whole_recipe_trains_on_two_folders_and_evaluates_each(market_root, tmp_path, capsys):
    from tests.conftest import write_market
    from training.cli import main

    other = write_market(tmp_path / "data" / "other", train_pids=range(20, 26), test_pids=range(1020, 1024))
    recipe = {
        "data.roots": f"[{market_root},{other}]",
        "run.eval_roots": f"[{market_root},{other}]",
        "run.eval_every": 1,
        "data.sampler": "pk",
        "data.num_instances": 2,
        "data.color_jitter": 0.3,
        "data.grayscale_prob": 0.1,
        "data.erasing_prob": 0.5,
        "data.source_weights": "{other: 0.5}",
        "model.ibn": "true",
        "loss.oap_mode": "ordered",
        "loss.label_smoothing": 0.1,
        "loss.triplet_weight": 1.0,
        "solver.scheduler": "cosine",
        "solver.epochs": 2,
        "run.progress": "true",
    }
    summary = train(load_config("pool.yaml", tiny_overrides(market_root, tmp_path / "run", **recipe)))
    watched = capsys.readouterr().out
    assert watched.count("(run.eval_every: for watching") == 2 and watched.count("| other |") == 2
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == json.loads(json.dumps(summary["history"]))
    assert summary["sources"] == {"market": {"images": 36, "identities": 6}, "other": {"images": 36, "identities": 6}}
    assert set(summary["evaluation"]) == {"market", "other"}
    assert [set(h.get("evaluation", ())) for h in summary["history"]] == [{"market", "other"}] * 2 + [set()]
    assert all(h["loss_tri"] > 0 and h["loss_oap"] > 0 for h in summary["history"][1:])
    main(
        [
            "evaluate",
            str(tmp_path / "run" / "model.pt"),
            "--data-root",
            str(market_root),
            "--data-root",
            str(other),
            "--quiet",
            "--output",
            str(tmp_path / "figures.json"),
        ]
    )
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| market") or line.startswith("| other")
    ]
    assert len(rows) == 2
    written = json.loads((tmp_path / "figures.json").read_text())
    assert set(written["evaluation"]) == {"market", "other"} and set(written["data"]) == {"market", "other"}
    assert {"commit", "command", "date", "machine"} <= set(written) and written["model"] == "model.pt"


def test_forced_bf16_trains_under_bf16_autocast_on_any_cpu(market_root, tmp_path):
    # run.force_cpu_bf16 takes bf16 where it is only emulated: how row cama_ordered_bf16 measures its accuracy here
    trainer = Trainer(
        load_config(
            "base.yaml",
            tiny_overrides(
                market_root,
                tmp_path,
                **{"loss.triplet_weight": 1.0, "data.sampler": "pk", "run.amp": "true", "run.force_cpu_bf16": "true"},
            ),
        )
    )
    images = torch.from_numpy(np.stack([trainer.dataset.image(i) for i in range(8)]))
    with trainer._autocast():
        assert trainer.model.train()(images).feature_maps.dtype == torch.bfloat16
    stats = trainer.train_epoch(1)
    assert all(np.isfinite(v) for v in stats.values() if isinstance(v, float))
    assert trainer.model.branches[0].stage[0].conv[0][0].weight.dtype == torch.float32


class ConvWrongUnderAutocast(torch.nn.Conv2d):
    """What oneDNN's AMX kernel did for some shapes: right in fp32, garbage in bf16."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1000 if torch.is_autocast_enabled(x.device.type) else out


def test_the_bf16_layer_check_passes_every_layer_of_a_real_model_and_flags_a_wrong_one(market_root, tmp_path):
    from training.engine import BF16_LAYER_TOLERANCE, bf16_layer_errors

    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **{"run.amp": "false"})))
    model, d = trainer.model, trainer.cfg.data
    errors = bf16_layer_errors(model, d.batch_size, d.height, d.width)
    assert len(errors) > 20 and max(errors.values()) < BF16_LAYER_TOLERANCE / 5  # bf16 rounding: about 0.003
    conv = model.trunk[1].conv[1]
    wrong = ConvWrongUnderAutocast(conv.in_channels, conv.out_channels, 1, bias=False)
    wrong.load_state_dict(conv.state_dict())
    model.trunk[1].conv[1] = wrong
    errors = bf16_layer_errors(model, d.batch_size, d.height, d.width)
    assert [name for name, error in errors.items() if error > BF16_LAYER_TOLERANCE] == ["trunk.1.conv.1"]
    assert model.training  # the check runs in eval mode and gives the model back as it found it


def test_training_falls_back_to_fp32_where_bf16_computes_a_layer_wrongly(market_root, tmp_path, monkeypatch, caplog):
    import training.engine as engine

    bf16 = {"run.amp": "true", "run.force_cpu_bf16": "true"}
    assert (
        Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path / "right", **bf16))).autocast_dtype
        == torch.bfloat16
    )
    monkeypatch.setattr(engine, "bf16_layer_errors", lambda *args: {"trunk.0.0": 0.001, "trunk.1.conv.1": 1.4})
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path / "wrong", **bf16)))
    assert trainer.autocast_dtype is None and "trunk.1.conv.1 1.4" in caplog.text


def test_a_commands_overrides_name_their_folders_from_the_environment(monkeypatch, tmp_path):
    """A training command's ``key=/path`` and ``key=[/a,/b]`` overrides are written as $DATA, $RUNS, $WEIGHTS
    paths, as bare paths are, so the metrics a run writes can go into bench/results as they are; an argument
    with a space or a glob character is double-quoted, so the command runs as it was typed."""
    from model_zoo.provenance import portable_command

    for name in ("DATA", "RUNS", "WEIGHTS"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    argv = [
        "/somewhere/training/__main__.py",
        "train",
        f"model.pretrained={tmp_path}/weights/osnet.pth",
        f"data.roots=[{tmp_path}/data/a,{tmp_path}/data/b]",
        f"run.output_dir={tmp_path}/runs/x",
        f"{tmp_path}/data/c",
        "solver.epochs=8",
        "--variants",
        "network mutual+camera lr 3.5e-05",
    ]
    assert portable_command(argv) == (
        'python -m training train model.pretrained=$WEIGHTS/osnet.pth "data.roots=[$DATA/a,$DATA/b]" '
        'run.output_dir=$RUNS/x $DATA/c solver.epochs=8 --variants "network mutual+camera lr 3.5e-05"'
    )
