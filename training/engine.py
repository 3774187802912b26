"""The training loop: the phases of ``training.solver`` (by default CAMA's: the classifiers' warm-up, then
the whole model), the architecture's objective (``training.objectives``), checkpoints, phase-aware resume,
the run folder, evaluation on a list of sets every few epochs and at the end."""

import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from model_zoo.architectures import build_model
from model_zoo.provenance import CPUINFO, cpu_features, cpu_name, data_fingerprint, provenance
from training.config import TrainConfig
from training.data import SAMPLER_REGISTRY, MarketDataset, TrainAugmentation, batch_loader
from training.checkpoints import model_settings
from training.evaluation import evaluate_sets, results_table, set_names, test_roots
from training.objectives import build_objective
from training.solver import (
    PhaseSchedule,
    build_optimizer,
    enter_phase,
    load_optimizer_state,
    phases_from_config,
    set_learning_rate,
    zero_subnormals,
)

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"
HISTORY_FILE = "history.json"  # every epoch so far, rewritten after each: a long run's figures without its checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast speeds training up. The CPU's flags, not oneDNN, decide: oneDNN
    reports bf16 on any AVX512 CPU and there emulates it, slower than fp32 (docs/results.md, Results)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features(cpuinfo)))


def autocast_dtype(device: torch.device, amp: bool, force_cpu_bf16: bool = False) -> Optional[torch.dtype]:
    """fp16 on CUDA, bf16 on a CPU with native bf16 (or on any CPU when forced), else None (fp32)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and (force_cpu_bf16 or cpu_has_native_bf16()) else None


# the largest error of a convolution or linear layer in bf16, relative to its largest fp32 output, that passes for
# bf16 rounding (measured: 0.002-0.005 where the kernel is right; 1 and above where it is wrong)
BF16_LAYER_TOLERANCE = 0.05


def bf16_layer_errors(model: nn.Module, batch_size: int, height: int, width: int) -> Dict[str, float]:
    """Each convolution and linear layer that the model's eval forward runs, at the input shape (and memory
    format) it meets there, run in bf16 autocast and in fp32 with bf16-rounded inputs and weights: the largest
    difference over the largest fp32 output, by layer name (inf where bf16 gave non-finite values). The backbone
    meets its training shapes there; layers only the training forward uses (the identity classifiers, PMM's
    max-pooled heads) are not checked.

    oneDNN's AMX bf16 convolution returns garbage for some shapes (a 3x3 stride-2 convolution on a 4x2 map,
    which ResNet-50's layer4 meets at 64x32 input; docs/results.md, "On a CPU with AMX"), while a whole network's bf16
    rounding is too large to tell such a layer from the rest. Forward kernels only."""
    seen: Dict[str, Tuple[torch.Size, bool]] = {}

    def remember(name):
        def hook(module, inputs, output):
            seen.setdefault(
                name,
                (inputs[0].shape, inputs[0].dim() == 4 and inputs[0].is_contiguous(memory_format=torch.channels_last)),
            )

        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    handles = [m.register_forward_hook(remember(name)) for name, m in layers.items()]
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    images = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8, generator=generator).to(device)
    was_training = model.training
    model.eval()  # batch-norm statistics stay as they are
    try:
        with torch.no_grad():
            model(images)
            return {
                name: _bf16_error(layers[name], shape, channels_last, generator)
                for name, (shape, channels_last) in seen.items()
            }
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _bf16_error(layer: nn.Module, shape: torch.Size, channels_last: bool, generator: torch.Generator) -> float:
    weight = layer.weight
    x = torch.randn(shape, generator=generator).to(weight.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rounded = {name: value.bfloat16().float() for name, value in layer.named_parameters()}
    reference = torch.func.functional_call(layer, rounded, (x.bfloat16().float(),))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        low = layer(x).float()
    if not torch.isfinite(low).all():
        return float("inf")
    return float((low - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def resolve_pretrained(model_cfg: dict) -> dict:
    """Turn ``pretrained: imagenet`` into a file path (MobileNetV2 only: its weights can be fetched offline)."""
    if model_cfg.get("pretrained") != "imagenet":
        return model_cfg
    if model_cfg["backbone"] != "mobilenetv2":
        raise ValueError(
            f"no offline ImageNet weights for {model_cfg['backbone']}: set model.pretrained to a "
            f"torchvision/timm checkpoint path"
        )
    from model_zoo.pretrained import mobilenetv2_imagenet_weights

    return {**model_cfg, "pretrained": str(mobilenetv2_imagenet_weights())}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.generator = seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.run.device)
        if not cfg.data.roots:
            raise ValueError("data.roots is empty: give one or more Market-1501-layout folders")
        d = cfg.data
        self.dataset = MarketDataset(d.roots, d.height, d.width, d.cache_images, cfg.run.progress, d.workers)
        self.model = build_model(resolve_pretrained(model_settings(cfg)), self.dataset.num_classes).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.objective = build_objective(cfg, self.model)
        self.schedule = PhaseSchedule(phases_from_config(cfg.solver))
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.optimizer_phase: Optional[int] = None  # the phase whose settings built the optimizer
        self.autocast_dtype = autocast_dtype(self.device, cfg.run.amp, cfg.run.force_cpu_bf16)
        if self.autocast_dtype == torch.bfloat16:
            self._fall_back_to_fp32_unless_bf16_agrees()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        # a GPU computes with subnormals at full speed; on a CPU a pass costs about 5% of a CAMA step, and they build up
        # over epochs
        self.zero_subnormals_every = cfg.run.zero_subnormals_every if self.device.type == "cpu" else 0
        self.augment = TrainAugmentation(
            d.flip_prob,
            d.padding,
            d.color_jitter,
            d.color_jitter_prob,
            d.grayscale_prob,
            d.erasing_prob,
            crop_area=tuple(d.crop_area),
            crop_aspect=tuple(d.crop_aspect),
        )
        self.sampler = self._sampler()
        self.eval_roots = list(cfg.run.eval_roots) or test_roots(d.roots)
        self.start_epoch = 0
        self.partial_epoch: Optional[Dict] = (
            None  # how far a checkpoint got into start_epoch (run.checkpoint_every_iters)
        )
        self.history: List[Dict] = []

    def _fall_back_to_fp32_unless_bf16_agrees(self) -> None:
        d = self.cfg.data
        wrong = {
            name: error
            for name, error in bf16_layer_errors(self.model, d.batch_size, d.height, d.width).items()
            if error > BF16_LAYER_TOLERANCE
        }
        if wrong:
            log.warning(
                "bf16 autocast computes %d layer(s) wrongly on this CPU at this input size (%s): training in fp32",
                len(wrong),
                ", ".join(f"{name} {error:.3g}" for name, error in list(wrong.items())[:3]),
            )
            self.autocast_dtype = None

    def _sampler(self):
        return SAMPLER_REGISTRY.get(self.cfg.data.sampler)(self.dataset, self.cfg.data, self.generator)

    @property
    def total_epochs(self) -> int:
        return self.schedule.total_epochs

    def enter_phase(self, index: int) -> None:
        """Trainable and eval-mode parts and loss weights as phase ``index`` says; a fresh optimizer unless the
        current one was built by a phase with the same settings."""
        phase = self.schedule.phases[index]
        enter_phase(self.model, phase)
        self.objective.set_phase_weights(phase.loss_weights)
        if self.optimizer is None or not self.schedule.shares_optimizer(self.optimizer_phase, index):
            self.optimizer = build_optimizer(self.model, phase)
            self.optimizer_phase = index

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self._autocast():
            out, loss, terms = self.objective(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stats = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        if out.logits is not None:
            correct = (out.logits.argmax(-1) == targets.unsqueeze(1)).float()
            stats["acc"] = correct.mean().item()
            if correct.shape[1] > 1:  # for the epoch's record, not the progress bar
                stats.update({f"acc_branch{i + 1}": value.item() for i, value in enumerate(correct.mean(dim=0))})
        return stats

    def iterations_per_epoch(self, phase=None) -> int:
        """The sampler's batches per epoch, capped by ``solver.max_iters_per_epoch`` and the phase's own cap."""
        caps = [cap for cap in (self.cfg.solver.max_iters_per_epoch, phase and phase.max_iters_per_epoch) if cap]
        return min([len(self.sampler), *caps])

    def _epoch_progress(self, epoch: int) -> Dict:
        """Where the epoch starts: part way, from a checkpoint's record, or at batch 0. ``generator`` is the
        generator's state at the epoch's start, from which its batches are drawn again on a resume."""
        partial, self.partial_epoch = self.partial_epoch, None
        if partial and partial["epoch"] == epoch:
            self.generator.set_state(partial["generator"])
            return partial
        return {
            "epoch": epoch,
            "iteration": 0,
            "sums": {},
            "seen": 0,
            "seconds": 0.0,
            "generator": self.generator.get_state(),
        }

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        index, phase, phase_epoch = self.schedule.phase_at(epoch)
        self.enter_phase(index)
        iters = self.iterations_per_epoch(phase)
        progress = self._epoch_progress(epoch)
        first, sums, seen = progress["iteration"], dict(progress["sums"]), progress["seen"]
        loader = batch_loader(
            self.dataset,
            self.augment,
            self.sampler,
            self.generator,
            iters,
            self.cfg.data.workers,
            self.device.type == "cuda",
            skip=first,
        )
        start = time.perf_counter() - progress["seconds"]
        every = self.cfg.run.checkpoint_every_iters
        bar = tqdm(
            total=iters,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.total_epochs} ({phase.name})",
            disable=not self.cfg.run.progress,
        )
        for iteration, (images, targets) in enumerate(loader, start=first):
            lr = phase.learning_rate(phase_epoch, iteration, iters)
            set_learning_rate(self.optimizer, lr)
            stats = self._step(images, targets)
            if self.zero_subnormals_every and (iteration + 1) % self.zero_subnormals_every == 0:
                zero_subnormals(self.model, self.optimizer)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            seen += len(targets)
            bar.set_postfix(
                {
                    key.removeprefix("loss_"): f"{value:.3f}"
                    for key, value in stats.items()
                    if not key.startswith("acc_branch")
                },
                lr=f"{lr:.1e}",
                img_s=f"{seen / (time.perf_counter() - start):.1f}",
            )
            bar.update()
            if every and (iteration + 1) % every == 0 and iteration + 1 < iters:
                self.save(
                    epoch - 1,
                    partial={
                        **progress,
                        "iteration": iteration + 1,
                        "sums": sums,
                        "seen": seen,
                        "seconds": time.perf_counter() - start,
                    },
                )
        bar.close()
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "phase": phase.name,
            **{k: v / max(1, iters) for k, v in sums.items()},
            "lr": lr,
            "images_per_s": seen / seconds,
            "seconds": seconds,
        }

    def evaluate(self) -> Dict[str, Dict]:
        d = self.cfg.data
        return evaluate_sets(self.model, self.eval_roots, d.height, d.width, self.device, self.cfg.run.progress)

    def save(self, epoch: int, name: str = LAST_CHECKPOINT, partial: Optional[Dict] = None) -> Path:
        """``epoch``: the last whole epoch (-1: none yet); ``partial``: how far the next one got."""
        path = self.out / name
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "phase": self.optimizer_phase,
            "config": self.cfg.to_dict(),
            "num_classes": self.dataset.num_classes,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "partial": partial,
        }
        write_whole(path, lambda temporary: torch.save(state, temporary))
        return path

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if "torch_rng" in state:  # checkpoints from before it was kept have none
            torch.set_rng_state(state["torch_rng"])
        self.history = state["history"]
        self.start_epoch = state["epoch"] + 1
        self.partial_epoch = state.get("partial")
        if self.start_epoch < self.total_epochs:
            self._resume_optimizer(state)
        log.info(
            "resumed from %s at epoch %d, batch %d",
            path,
            self.start_epoch,
            (self.partial_epoch or {}).get("iteration", 0),
        )

    def _resume_optimizer(self, state: Dict) -> None:
        """Carry the optimizer's state over if the checkpoint's phase and the next one share an optimizer;
        a new phase with other settings starts a fresh one, as it would have without the interruption."""
        next_phase = self.schedule.phase_at(self.start_epoch)[0]
        saved_phase = state.get("phase")
        if saved_phase is None:  # checkpoints from before phases existed
            saved_phase = self.schedule.phase_at(state["epoch"])[0]
        self.enter_phase(saved_phase)
        if self.schedule.shares_optimizer(saved_phase, next_phase):
            load_optimizer_state(self.optimizer, state["optimizer"])

    def fit(self) -> Dict:
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        started = time.perf_counter()
        every = self.cfg.run.eval_every
        for epoch in range(self.start_epoch, self.total_epochs):
            record = self.train_epoch(epoch)
            if every and (epoch + 1) % every == 0 and epoch + 1 < self.total_epochs:
                record["evaluation"] = self.evaluate()
                if self.cfg.run.progress:
                    tqdm.write(
                        f"epoch {epoch + 1} of {self.total_epochs} (run.eval_every: for watching, never for "
                        f"choosing)\n" + results_table(record["evaluation"])
                    )
            self.history.append(record)
            write_json(self.out / HISTORY_FILE, self.history)
            last_of_phase = epoch + 1 in self.schedule.starts or epoch + 1 == self.total_epochs
            if (epoch + 1) % self.cfg.run.checkpoint_every == 0 or last_of_phase:
                self.save(epoch)
        self.save(self.total_epochs - 1, FINAL_CHECKPOINT)
        # metrics.json is a result file (bench/results holds copies): folders by name only, config.yaml has them
        summary = {
            **provenance(),
            "config": self.cfg.portable_dict(),
            "history": self.history,
            "hardware": hardware_description(self.device),
            "precision": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            "train_seconds_this_session": time.perf_counter() - started,
            "train_seconds_total": sum(h["seconds"] for h in self.history),
            "num_classes": self.dataset.num_classes,
            "num_train_images": len(self.dataset),
            "sources": self.dataset.describe_sources(),
            "bad_files": self.dataset.bad_files,
            "unnamed_files": self.dataset.unnamed,
        }
        if self.cfg.run.evaluate_at_end:
            summary["evaluation"] = self.evaluate()
            summary["data"] = dict(zip(set_names(self.eval_roots), map(data_fingerprint, self.eval_roots)))
        write_json(self.out / "metrics.json", summary)
        return summary


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file beside ``path``, which then replaces it: a reader (or a resume after a
    crash) never sees a half-written file."""
    temporary = path.with_suffix(".tmp")
    write(temporary)
    temporary.replace(path)


def write_json(path: Path, value) -> None:
    write_whole(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2)))


def train(cfg: TrainConfig, resume: Optional[Path] = None) -> Dict:
    """Train as ``cfg`` says; with ``resume``, continue from that checkpoint. Returns the run summary."""
    trainer = Trainer(cfg)
    if resume:
        trainer.resume(Path(resume))
    return trainer.fit()
