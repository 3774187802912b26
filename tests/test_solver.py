"""Training phases, optimisers and schedules (training/solver.py), and phase-aware training and resume."""

import pytest
import torch
from torch import nn

from tests.conftest import tiny_overrides
from training import load_config, train
from training.engine import Trainer
from training.solver import (
    Phase,
    PhaseSchedule,
    build_optimizer,
    enter_phase,
    phases_from_config,
    set_learning_rate,
    zero_subnormals,
)


def rates(phases, iters=10):
    """The base rate at every iteration of every epoch, phase by phase."""
    schedule = PhaseSchedule(phases)
    out = []
    for epoch in range(schedule.total_epochs):
        _, phase, local = schedule.phase_at(epoch)
        out += [phase.learning_rate(local, it, iters) for it in range(iters)]
    return out


def test_the_default_phases_are_cama_warm_up_then_the_whole_model():
    solver = load_config(
        None,
        [
            "solver.warmup_epochs=2",
            "solver.epochs=3",
            "solver.lr=1.0",
            "solver.warmup_lr=0.0",
            "solver.step_size=2",
            "solver.gamma=0.5",
        ],
    ).solver
    warmup, main = phases_from_config(solver)
    assert (warmup.trainable, warmup.epochs, main.trainable, main.epochs) == (["classifiers"], 2, ["all"], 3)
    lrs = rates([warmup, main], iters=5)
    # linear over the warm-up's 10 iterations: 0, 1/9, ..., 1; then the step schedule 1, 1, 0.5
    assert lrs[:10] == pytest.approx([i / 9 for i in range(10)])
    assert lrs[10::5] == pytest.approx([1.0, 1.0, 0.5])


def test_cosine_runs_from_lr_down_to_its_floor():
    lrs = rates([Phase("main", 4, scheduler="cosine", lr=1.0, final_lr_factor=0.1)])
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[20] == pytest.approx(0.55)  # half way: the mean of lr and its floor


def test_pmm_staircase_warm_up_then_multi_step():
    """The schedule of PMM's code (BDB), by 1-indexed epoch: e < 50: 1e-4 (floor(e/5) + 1); then 1e-3, 1e-4
    from e = 200, 1e-5 from e = 300 (paper-family design, 1.7)."""
    phases = [
        Phase("warmup", 49, scheduler="staircase", start_lr=1e-4, lr=1e-3, step_size=5),
        Phase("main", 351, scheduler="multistep", lr=1e-3, milestones=[150, 250]),
    ]
    per_epoch = rates(phases, iters=1)
    epochs = [1, 4, 5, 9, 45, 49, 50, 199, 200, 299, 300, 400]
    expected = [1e-4, 1e-4, 2e-4, 2e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    assert [per_epoch[e - 1] for e in epochs] == pytest.approx(expected)


def test_explicit_phases_take_the_solver_keys_unless_they_set_their_own():
    solver = load_config(
        None,
        [
            "solver.optimizer=sgd",
            "solver.lr=0.1",
            "solver.momentum=0.8",
            "solver.phases=[{epochs: 2, trainable: [classifiers]}, {name: joint, epochs: 3, lr: "
            "0.01, optimizer: adam}]",
        ],
    ).solver
    first, second = phases_from_config(solver)
    assert (first.name, first.optimizer, first.lr, first.momentum) == ("phase1", "sgd", 0.1, 0.8)
    assert (second.name, second.optimizer, second.lr) == ("joint", "adam", 0.01)
    with pytest.raises(ValueError, match="unknown phase keys"):
        phases_from_config(load_config(None, ["solver.phases=[{epochs: 1, learning_rate: 1}]"]).solver)
    with pytest.raises(ValueError, match="unknown scheduler"):
        Phase("x", 1, scheduler="exponential")


class TwoParts(nn.Module):
    """A body with batch norm and a head, named as an architecture names its parameter groups."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def parameter_groups(self):
        return {"body": [self.body], "head": [self.head]}

    def forward(self, x):
        return self.head(self.body(x))


def one_step(model, phase):
    enter_phase(model, phase)
    optimizer = build_optimizer(model, phase)
    set_learning_rate(optimizer, phase.lr)
    loss = model(torch.randn(16, 4)).square().mean()
    loss.backward()
    optimizer.step()
    return optimizer


def test_an_eval_mode_group_keeps_its_weights_and_batch_norm_statistics_bit_identical():
    torch.manual_seed(0)
    model = TwoParts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_step(model, Phase("second", 1, optimizer="sgd", lr=0.1, eval_mode=["body"]))
    assert not model.body.training and model.head.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) == key.startswith("body."), key


def test_sgd_with_momentum_and_a_learning_rate_per_group():
    model = TwoParts()
    optimizer = one_step(model, Phase("p", 1, optimizer="sgd", lr=0.1, momentum=0.9, lr_multipliers={"head": 10.0}))
    assert isinstance(optimizer, torch.optim.SGD)
    lrs = {group["group"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == pytest.approx({"head": 1.0, "default": 0.1})
    assert all(group["momentum"] == 0.9 for group in optimizer.param_groups)
    with pytest.raises(ValueError, match="unknown parameter group"):
        build_optimizer(model, Phase("p", 1, lr_multipliers={"neck": 2.0}))


def test_phases_with_equal_settings_share_an_optimizer_and_others_do_not():
    schedule = PhaseSchedule([Phase("a", 1), Phase("b", 2, lr=1.0), Phase("c", 1, optimizer="sgd")])
    assert (
        schedule.shares_optimizer(0, 1) and not schedule.shares_optimizer(1, 2) and not schedule.shares_optimizer(0, 2)
    )
    assert [schedule.phase_at(e)[0] for e in range(4)] == [0, 1, 1, 2]


TWO_OPTIMIZERS = (
    "[{name: warmup, epochs: 1, trainable: [classifiers], optimizer: adam, lr: 0.001}, "
    "{name: joint, epochs: %d, optimizer: sgd, lr: 0.01, loss_weights: {loss_oap: 0}}]"
)


def test_training_switches_optimizer_and_loss_weights_by_phase_and_resumes_per_phase(market_root, tmp_path):
    first = tmp_path / "first"
    phases = {"solver.phases": TWO_OPTIMIZERS % 0, "run.evaluate_at_end": "false"}
    summary = train(load_config("base.yaml", tiny_overrides(market_root, first, **phases)))
    assert [h["phase"] for h in summary["history"]] == ["warmup"] and "loss_oap" in summary["history"][0]

    # resumed into the SGD phase: a fresh optimizer (Adam's moments do not carry into SGD), no OAP term
    trainer = Trainer(
        load_config(
            "base.yaml",
            tiny_overrides(market_root, tmp_path / "second", **{**phases, "solver.phases": TWO_OPTIMIZERS % 2}),
        )
    )
    trainer.resume(first / "last.pt")
    record = trainer.train_epoch(trainer.start_epoch)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and record["phase"] == "joint" and "loss_oap" not in record
    trainer.save(1)

    # resumed inside the SGD phase: its momentum buffers come back
    again = Trainer(
        load_config(
            "base.yaml",
            tiny_overrides(market_root, tmp_path / "third", **{**phases, "solver.phases": TWO_OPTIMIZERS % 2}),
        )
    )
    again.resume(trainer.out / "last.pt")
    assert isinstance(again.optimizer, torch.optim.SGD) and again.optimizer.state
    momentum = {
        id(p): again.optimizer.state[p]["momentum_buffer"]
        for p in again.model.parameters()
        if p in again.optimizer.state
    }
    original = {
        id(q): trainer.optimizer.state[p]["momentum_buffer"]
        for p, q in zip(trainer.model.parameters(), again.model.parameters())
        if p in trainer.optimizer.state
    }
    assert momentum.keys() == original.keys() and all(torch.equal(momentum[k], original[k]) for k in momentum)


def test_a_checkpoint_from_before_phases_resumes(market_root, tmp_path):
    run = tmp_path / "old"
    train(
        load_config(
            "base.yaml", tiny_overrides(market_root, run, **{"solver.epochs": 0, "run.evaluate_at_end": "false"})
        )
    )
    state = torch.load(run / "last.pt", weights_only=False)
    del state["phase"]
    for group in state["optimizer"]["param_groups"]:
        del group["multiplier"], group["group"]
    torch.save(state, run / "legacy.pt")
    trainer = Trainer(
        load_config("base.yaml", tiny_overrides(market_root, tmp_path / "new", **{"run.evaluate_at_end": "false"}))
    )
    trainer.resume(run / "legacy.pt")
    assert trainer.optimizer.state and trainer.optimizer.param_groups[0]["multiplier"] == 1.0
    assert trainer.train_epoch(trainer.start_epoch)["phase"] == "main"


def test_a_phase_caps_its_own_epochs_and_the_solver_caps_every_phase(market_root, tmp_path):
    phases = "[{epochs: 1, max_iters_per_epoch: 1}, {epochs: 1, max_iters_per_epoch: 5}, {epochs: 1}]"
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **{"solver.phases": phases})))
    assert [trainer.iterations_per_epoch(p) for p in trainer.schedule.phases] == [1, 2, 2]  # the solver's cap is 2


def test_zero_subnormals_zeroes_weights_statistics_and_optimizer_state_below_the_smallest_normal_only():
    torch.manual_seed(0)
    model = TwoParts()
    optimizer = one_step(model, Phase("main", 1, lr=0.1))
    tensors = [model.head.weight, model.body[1].running_var, optimizer.state[model.head.weight]["exp_avg_sq"]]
    with torch.no_grad():
        for tensor in tensors:
            tensor.view(-1)[:2] = torch.tensor([1e-40, -1e-39])
            tensor.view(-1)[2] = 2e-38  # normal: kept
    zero_subnormals(model, optimizer)
    for tensor in tensors:
        assert tensor.view(-1)[:2].tolist() == [0.0, 0.0]
        assert tensor.view(-1)[2].item() == pytest.approx(2e-38)


def test_training_on_a_cpu_zeroes_subnormal_weights_every_few_steps(market_root, tmp_path):
    overrides = {"solver.max_iters_per_epoch": 2, "run.zero_subnormals_every": 2}
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **overrides)))
    weights = [p for p in trainer.model.parameters() if p.dim() > 1]
    with torch.no_grad():
        for weight in weights:
            weight.view(-1)[:3] = 1e-40
    trainer.train_epoch(0)
    assert all(((w != 0) & (w.abs() < torch.finfo(torch.float32).tiny)).sum() == 0 for w in weights)
