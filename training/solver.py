"""Training phases, optimisers and learning-rate schedules.

A run is a list of phases (CAMA's classifier warm-up then the whole model; FMN's GRN then mask + LAN with the
GRN frozen; PMM's staircase warm-up then multi-step decay). Each phase says how many epochs it lasts, which of
the architecture's parameter groups learn (``parameter_groups``: ``all``, CAMA's ``classifiers``, ...), which
are held in eval mode with no gradient (batch-norm statistics frozen), its optimiser and learning rate (one
rate per group through ``lr_multipliers``, or a constant rate through ``fixed_lr``), its schedule, and
loss-term weights that differ from the objective's.

The optimiser: consecutive phases with the same optimiser settings share one optimiser, so Adam's moments
carry over from CAMA's warm-up into the main phase; a phase with other settings starts a fresh one. Every
parameter is in the optimiser from the start; a phase's frozen parameters get no gradient, and
PyTorch's optimisers skip parameters without a gradient (weight decay included).
"""

import math
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from model_zoo.architectures.common import parameter_groups

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "step", "multistep", "staircase")


@dataclass
class Phase:
    """One training phase; epochs and iterations below count from the phase's start."""

    name: str
    epochs: int
    trainable: List[str] = field(default_factory=lambda: ["all"])
    eval_mode: List[str] = field(default_factory=list)
    optimizer: str = "adam"
    lr: float = 3e-4
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    fixed_lr: Dict[str, float] = field(
        default_factory=dict
    )  # groups held at this rate whatever the schedule (CLPD's step 2)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "constant"
    start_lr: float = 0.0  # linear: the rate at the phase's first iteration, rising to lr at its last
    step_size: int = 20  # step: x gamma every step_size epochs; staircase: lr grows every step_size epochs
    milestones: List[int] = field(default_factory=list)  # multistep: x gamma at each of these epochs
    gamma: float = 0.1
    final_lr_factor: float = 0.01  # cosine: the last rate, as a fraction of lr
    loss_weights: Dict[str, float] = field(default_factory=dict)
    max_iters_per_epoch: Optional[int] = (
        None  # a cap on this phase's epochs (solver.max_iters_per_epoch caps every phase)
    )

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"phase {self.name!r}: unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"phase {self.name!r}: unknown scheduler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}"
            )
        if self.epochs < 0:
            raise ValueError(f"phase {self.name!r}: epochs must be >= 0")

    @property
    def optimizer_settings(self) -> Tuple:
        """Phases with equal settings share one optimiser (and its state)."""
        return (
            self.optimizer,
            self.weight_decay,
            self.momentum,
            self.nesterov,
            tuple(sorted(self.lr_multipliers.items())),
            tuple(sorted(self.fixed_lr.items())),
        )

    def learning_rate(self, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """The base rate (before a group's multiplier) at ``iteration`` of ``epoch``, both from the phase's start."""
        done = epoch * iters_per_epoch + iteration
        if self.scheduler == "constant":
            return self.lr
        if self.scheduler == "linear":
            progress = min(1.0, done / max(1, self.epochs * iters_per_epoch - 1))
            return self.start_lr + (self.lr - self.start_lr) * progress
        if self.scheduler == "cosine":
            progress = done / max(1, self.epochs * iters_per_epoch)
            return self.lr * (
                self.final_lr_factor + (1 - self.final_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
            )
        if self.scheduler == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        if self.scheduler == "multistep":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        # staircase (BDB/PMM's warm-up, 1-indexed epochs e: start_lr x (floor(e / step_size) + 1)), capped at lr
        return min(self.lr, self.start_lr * ((epoch + 1) // self.step_size + 1))


def phase_from_dict(values: dict, defaults: dict) -> Phase:
    known = {f.name for f in fields(Phase)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown phase keys {sorted(unknown)}; known: {sorted(known)}")
    return Phase(**{**{k: v for k, v in defaults.items() if k in known}, **values})


def phases_from_config(solver) -> List[Phase]:
    """``solver.phases`` when given (each phase takes the solver's optimiser keys unless it sets its own);
    otherwise CAMA's two phases from the solver keys: ``warmup_epochs`` training the classifiers with the rate
    rising linearly from ``warmup_lr`` to ``lr``, then ``epochs`` training everything with ``scheduler``."""
    defaults = {
        "optimizer": solver.optimizer,
        "lr": solver.lr,
        "weight_decay": solver.weight_decay,
        "momentum": solver.momentum,
        "nesterov": solver.nesterov,
    }
    if solver.phases:
        return [phase_from_dict({"name": f"phase{i + 1}", **p}, defaults) for i, p in enumerate(solver.phases)]
    main = {
        "scheduler": solver.scheduler,
        "step_size": solver.step_size,
        "milestones": solver.milestones,
        "gamma": solver.gamma,
        "final_lr_factor": solver.final_lr_factor,
    }
    return [
        phase_from_dict(
            {
                "name": "warmup",
                "epochs": solver.warmup_epochs,
                "trainable": ["classifiers"],
                "scheduler": "linear",
                "start_lr": solver.warmup_lr,
            },
            defaults,
        ),
        phase_from_dict({"name": "main", "epochs": solver.epochs, **main}, defaults),
    ]


class PhaseSchedule:
    """Where each global epoch falls: ``phase_at(epoch) -> (index, phase, epoch within the phase)``."""

    def __init__(self, phases: Sequence[Phase]):
        self.phases = list(phases)
        self.starts = [sum(p.epochs for p in self.phases[:i]) for i in range(len(self.phases))]

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def phase_at(self, epoch: int) -> Tuple[int, Phase, int]:
        for index in reversed(range(len(self.phases))):
            if epoch >= self.starts[index] and self.phases[index].epochs:
                return index, self.phases[index], epoch - self.starts[index]
        raise ValueError(f"epoch {epoch} is outside every phase")

    def shares_optimizer(self, first: int, last: int) -> bool:
        """Whether phases ``first``..``last`` all run on one optimiser (its state carries across them)."""
        settings = {self.phases[i].optimizer_settings for i in range(min(first, last), max(first, last) + 1)}
        return len(settings) == 1


def _modules_parameters(modules: Sequence[nn.Module]) -> List[nn.Parameter]:
    seen, params = set(), []
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def _group_parameters(model: nn.Module, names: Sequence[str]) -> List[nn.Parameter]:
    groups = parameter_groups(model)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; this architecture has {', '.join(groups)}")
    return _modules_parameters([m for n in names for m in groups[n]])


def build_optimizer(model: nn.Module, phase: Phase) -> torch.optim.Optimizer:
    """An optimiser over every parameter; a parameter in a ``fixed_lr`` group learns at that constant rate, one
    in a ``lr_multipliers`` group at lr x that multiplier (the first group that names a parameter claims it,
    ``fixed_lr`` first), the rest at lr. ``group["multiplier"]`` and ``group["fixed_lr"]`` keep the rule for the
    schedule."""
    claimed, param_groups = set(), []
    rules = [(name, 1.0, rate) for name, rate in phase.fixed_lr.items()] + [
        (name, m, None) for name, m in phase.lr_multipliers.items()
    ]
    for name, multiplier, fixed in rules:
        params = [p for p in _group_parameters(model, [name]) if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        param_groups.append({"params": params, "multiplier": multiplier, "fixed_lr": fixed, "group": name})
    rest = [p for p in model.parameters() if id(p) not in claimed]
    param_groups.append({"params": rest, "multiplier": 1.0, "fixed_lr": None, "group": "default"})
    param_groups = [g for g in param_groups if g["params"]]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay, nesterov=phase.nesterov
        )
    return torch.optim.Adam(param_groups, lr=phase.lr, weight_decay=phase.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr")
        group["lr"] = base_lr * group["multiplier"] if fixed is None else fixed


def enter_phase(model: nn.Module, phase: Phase) -> None:
    """Train mode; the phase's ``trainable`` groups get gradients, every other parameter none; its
    ``eval_mode`` groups run in eval mode (batch-norm statistics frozen) and never learn."""
    model.train()
    frozen = {id(p) for p in _group_parameters(model, phase.eval_mode)}
    learning = {id(p) for p in _group_parameters(model, phase.trainable)} - frozen
    for param in model.parameters():
        param.requires_grad_(id(param) in learning)
    for module in [m for name in phase.eval_mode for m in parameter_groups(model)[name]]:
        module.eval()


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Moments and step counts from a checkpoint; each group's multiplier and fixed rate stay the config's
    (checkpoints written before phases existed have none)."""
    rules = [(g["multiplier"], g["fixed_lr"], g["group"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (multiplier, fixed, name) in zip(optimizer.param_groups, rules):
        group["multiplier"], group["fixed_lr"], group["group"] = multiplier, fixed, name


SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


@torch.no_grad()
def zero_subnormals(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Set the model's float32 parameters and buffers, and the optimiser's state, to zero where their magnitude
    is below float32's smallest normal number.

    Weight decay drives unused weights there over a long schedule, and x86 CPUs compute with subnormal operands
    in microcode: a checkpoint at the end of the full CAMA schedule ran a training step 1.4-1.8x faster with its
    14,966 subnormal values zeroed (``bench/subnormal_weights.py --checkpoint``). Values that small change no
    output and no update measurably."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    for tensor in tensors:
        if tensor.dtype == torch.float32:
            tensor.masked_fill_(tensor.abs() < SMALLEST_NORMAL, 0.0)
