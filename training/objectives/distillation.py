"""Distillation from any contract model: a frozen teacher (an ONNX file through ONNX Runtime) embeds the same
augmented batch the student sees, and two terms pull the student towards it:

- ``loss_kd_feature``: 1 - cos(student embedding, teacher embedding), per image (the embeddings must have
  the same size);
- ``loss_kd_relation``: the mean squared difference of the two in-batch similarity matrices (every pair's
  retrieval score), which needs no common size: the student learns to rank as the teacher ranks.

``Distilled`` wraps any objective: its own terms keep their weights, the two above join them (``loss.kd_*``;
a phase may set them to 0, and the teacher then does not run). The teacher reads uint8 RGB as the student
does, so any file the service could serve is a teacher, an imported Open Model Zoo model included.
"""

from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from model_zoo.architectures.common import ReIDOutput
from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, check_session
from training.objectives.base import Objective

KD_TERMS = ("loss_kd_feature", "loss_kd_relation")


class OnnxTeacher:
    """A contract ONNX file's whole embedding, scaled to unit norm (its score is then a plain dot product)."""

    def __init__(self, path: Path, input_size, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.contract = check_session(self.session)
        if (self.contract.input_height, self.contract.input_width) != tuple(input_size):
            raise ValueError(
                f"the teacher {Path(path).name} reads "
                f"{self.contract.input_height}x{self.contract.input_width} images, "
                f"the student {input_size[0]}x{input_size[1]}: train the student at the teacher's size"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        (embedding,) = self.session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: np.ascontiguousarray(images.cpu().numpy())})
        return F.normalize(torch.from_numpy(embedding), dim=1).to(images.device)


def unit_embedding(out: ReIDOutput) -> torch.Tensor:
    """The student's embedding scaled to unit norm: its dot products are the service's retrieval scores."""
    return F.normalize(out.embedding.float(), dim=1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the in-batch cosine matrices, the diagonal (always 1) left out."""
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    return (student @ student.T - teacher @ teacher.T)[off_diagonal].pow(2).mean()


class Distilled(Objective):
    def __init__(self, inner: Objective, teacher: OnnxTeacher, feature_weight: float, relation_weight: float):
        super().__init__(inner.cfg, inner.model)
        self.inner, self.teacher = inner, teacher
        self.kd_weights = {"loss_kd_feature": feature_weight, "loss_kd_relation": relation_weight}
        self.teacher_embedding = None

    def default_weights(self) -> Dict[str, float]:
        return {**self.inner.default_weights(), **self.kd_weights}

    def set_phase_weights(self, overrides: Dict[str, float]) -> None:
        super().set_phase_weights(overrides)
        self.inner.set_phase_weights({name: weight for name, weight in overrides.items() if name not in KD_TERMS})

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> ReIDOutput:
        weights = self.weights()
        self.teacher_embedding = self.teacher.embed(images) if any(weights[name] for name in KD_TERMS) else None
        return self.inner.forward(images, targets)

    def terms(self, out: ReIDOutput, targets: torch.Tensor, active: set) -> Dict[str, torch.Tensor]:
        terms = self.inner.terms(out, targets, active - set(KD_TERMS))
        if active & set(KD_TERMS):
            student, teacher = unit_embedding(out), self.teacher_embedding
            if "loss_kd_feature" in active:
                if student.shape[1] != teacher.shape[1]:
                    raise ValueError(
                        f"loss_kd_feature compares embeddings of one size: student {student.shape[1]}, "
                        f"teacher {teacher.shape[1]}; "
                        "use loss.kd_feature_weight=0 and the relation term"
                    )
                terms["loss_kd_feature"] = (1 - (student * teacher).sum(dim=1)).mean()
            if "loss_kd_relation" in active:
                terms["loss_kd_relation"] = relation_loss(student, teacher)
        return terms
