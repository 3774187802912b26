"""Distillation from a contract ONNX teacher (training/objectives/distillation.py), on tiny synthetic data."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_zoo.importers import import_model
from tests.conftest import tiny_overrides
from training import load_config, train
from training.engine import Trainer
from training.objectives.distillation import relation_loss


@pytest.fixture(scope="module")
def teacher(tiny_ir, tmp_path_factory):
    """The tiny IR imported: a 12-d contract model that reads the tiny images."""
    return import_model(tiny_ir, tmp_path_factory.mktemp("teacher") / "teacher.onnx")["output"]


def test_the_relation_term_is_zero_for_the_same_ranking_and_grows_with_disagreement():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 5), dim=1)
    assert relation_loss(a, a) == 0
    rotated = a @ torch.linalg.qr(torch.randn(5, 5))[0]  # the same similarities in another basis: nothing to learn
    assert relation_loss(rotated, a) < 1e-10
    assert relation_loss(F.normalize(torch.randn(8, 7), dim=1), a) > 0.01


def test_a_student_that_is_its_teacher_has_nothing_to_learn(market_root, tmp_path, tiny_ir, teacher):
    """The imported IR fine-tuned with its own import as teacher: both terms are 0 on the first batch, so the
    teacher sees the student's own augmented pixels in the student's channel order."""
    overrides = tiny_overrides(
        market_root,
        tmp_path,
        **{
            "model.architecture": "openvino_ir",
            "model.source": tiny_ir,
            "loss.teacher": teacher,
            "loss.kd_feature_weight": 1.0,
        },
    )
    trainer = Trainer(load_config("omz_distill.yaml", overrides))
    images = torch.from_numpy(np.stack([trainer.dataset.image(i) for i in range(8)]))
    targets = torch.from_numpy(trainer.dataset.labels[:8])
    warmup, main = trainer.schedule.phases
    trainer.objective.set_phase_weights(warmup.loss_weights)
    _, _, terms = trainer.objective(images, targets)
    assert trainer.objective.teacher_embedding is None and not set(terms) & {
        "loss_kd_feature",
        "loss_kd_relation",
    }  # no teacher run
    trainer.objective.set_phase_weights(main.loss_weights)
    _, _, terms = trainer.objective(images, targets)
    assert terms["loss_kd_feature"].item() < 1e-6 and terms["loss_kd_relation"].item() < 1e-10


def test_a_cama_student_learns_from_a_teacher_of_another_size_by_its_rankings(market_root, tmp_path, teacher):
    overrides = tiny_overrides(market_root, tmp_path, **{"loss.teacher": teacher, "loss.kd_feature_weight": 0.0})
    summary = train(load_config("base.yaml", overrides))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert all(
        np.isfinite(h["loss_kd_relation"]) and h["loss_kd_relation"] > 0 and "loss_kd_feature" not in h for h in history
    )
    assert summary["evaluation"]


def test_the_feature_term_refuses_embeddings_of_different_sizes(market_root, tmp_path, teacher):
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **{"loss.teacher": teacher})))
    images = torch.from_numpy(np.stack([trainer.dataset.image(i) for i in range(4)]))
    trainer.objective.set_phase_weights({})
    with pytest.raises(ValueError, match="one size"):
        trainer.objective(images, torch.from_numpy(trainer.dataset.labels[:4]))


def test_a_teacher_of_another_input_size_is_refused(market_root, tmp_path, teacher):
    with pytest.raises(ValueError, match="train the student at the teacher's size"):
        Trainer(
            load_config(
                "base.yaml",
                tiny_overrides(market_root, tmp_path, **{"loss.teacher": teacher, "data.height": 32, "data.width": 16}),
            )
        )
