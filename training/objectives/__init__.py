"""Training objectives: each architecture owns one, registered by name in ``OBJECTIVE_REGISTRY``.

An objective runs the training forward (it may hand the labels to the model: PMM's Grad-CAM and negatives
need them) and returns named loss terms; each term has a weight from the config, which a training phase may
override (``solver.phases[i].loss_weights``, 0 switches a term off). The trainer sums weight x term, scales,
steps and logs every term by name. A new architecture's loss is a new file here, registered under the
architecture's name (or chosen with ``loss.objective``), not an edit of the trainer.
"""

from training.objectives.base import OBJECTIVE_REGISTRY, Objective, build_objective
from training.objectives import cama, casn, clpd, fmn, imported, pmm  # noqa: F401  (registration)

__all__ = ["OBJECTIVE_REGISTRY", "Objective", "build_objective"]
