import pytest

from training.cli import build_parser
from training.config import CONFIG_DIR, TrainConfig, load_config


def test_cpu_schedule_layers_on_the_paper_schedule():
    cfg = load_config("cpu_short.yaml")
    assert (cfg.solver.warmup_epochs, cfg.solver.epochs, cfg.solver.step_size) == (1, 3, 2)
    assert (cfg.solver.lr, cfg.solver.warmup_lr, cfg.data.batch_size) == (3e-4, 3e-6, 32)
    paper = load_config("base.yaml")
    assert (paper.solver.warmup_epochs, paper.solver.epochs, paper.solver.step_size) == (10, 50, 20)


def test_overrides_are_parsed_as_yaml_and_unknown_keys_refused():
    cfg = load_config(
        "base.yaml", ["model.num_branches=1", "loss.alpha=0", "model.reduction_dim=256", "model.pretrained=null"]
    )
    assert (
        cfg.model.num_branches == 1
        and cfg.loss.alpha == 0
        and cfg.model.reduction_dim == 256
        and cfg.model.pretrained is None
    )
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, ["solver.learning_rate=1"])
    with pytest.raises(ValueError):
        load_config(None, ["solver.lr"])


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for section, values in TrainConfig().to_dict().items():
        for name in values:
            assert f"{section}.{name}=" in text
    assert "model.clpd_parts=" in text and "loss.casn_ia_weight=" in text  # declared beside their architectures


def test_the_pool_recipe_layers_on_the_paper_schedule_and_overrides_replace_whole_values():
    cfg = load_config("pool.yaml")
    assert (cfg.model.ibn, cfg.loss.oap_mode, cfg.loss.k, cfg.data.height, cfg.data.width) == (
        True,
        "ordered",
        5,
        128,
        64,
    )
    assert cfg.model.backbone == "mobilenetv2" and cfg.data.source_weights == {"TownCentre": 0.5}
    emptied = load_config("pool.yaml", ["data.source_weights={}", "data.roots=[/a, /b]"])
    assert emptied.data.source_weights == {} and emptied.data.roots == ["/a", "/b"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_builds_its_model_and_its_phases_name_real_parts(name, tmp_path):
    from model_zoo.architectures import build_model
    from model_zoo.architectures.common import parameter_groups
    from training.checkpoints import model_settings
    from training.objectives import build_objective
    from training.solver import phases_from_config

    overrides = ["model.pretrained=null"]
    if load_config(name).model.architecture.startswith("openvino_ir"):  # a tiny IR stands in for the real one
        from tests.conftest import TINY_HEIGHT, TINY_WIDTH
        from tests.tiny_ir import omz_like_ir

        source = omz_like_ir(tmp_path / "tiny.xml")
        overrides += [f"model.source={source}", f"data.height={TINY_HEIGHT}", f"data.width={TINY_WIDTH}"]
        if (
            "kd_relation_weight" in (CONFIG_DIR / name).read_text()
        ):  # a distillation config: the tiny IR imported is its teacher
            from model_zoo.importers import import_model

            overrides.append(f"loss.teacher={import_model(source, tmp_path / 'teacher.onnx')['output']}")
    cfg = load_config(name, overrides)
    model = build_model(model_settings(cfg), num_classes=4)
    groups, terms = set(parameter_groups(model)), set(build_objective(cfg, model).weights())
    for phase in phases_from_config(cfg.solver):
        assert set(phase.trainable + phase.eval_mode + list(phase.lr_multipliers) + list(phase.fixed_lr)) <= groups, (
            phase.name
        )
        assert set(phase.loss_weights) <= terms, phase.name


def test_the_short_pool_schedule_is_the_two_commands_the_first_rows_ran():
    from dataclasses import replace

    from training.solver import phases_from_config

    short = phases_from_config(load_config("pool_short.yaml").solver)
    warmup_run = phases_from_config(load_config("pool.yaml", ["solver.epochs=0"]).solver)[0]
    main_run = phases_from_config(load_config("pool.yaml", ["solver.epochs=3"]).solver)[1]
    assert short == [warmup_run, replace(main_run, max_iters_per_epoch=200)]
