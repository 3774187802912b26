"""The training loop: warm-up of the classifiers, then the whole model; checkpoints, resume, run folder,
evaluation on a list of sets every few epochs and at the end."""
import json
import logging
import math
import platform
import random
import re
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from tqdm import tqdm

from model_zoo.architectures import build_model
from model_zoo.architectures.common import branch_features
from training.config import TrainConfig, from_dict
from training.data import MarketDataset, PKSampler, RandomBatchSampler, TrainAugmentation, batch_loader
from training.evaluation import evaluate_sets, test_roots
from training.losses import BatchHardTripletLoss, IdentificationLoss, OverlappedActivationPenalty

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """Linux's CPU description ('' elsewhere)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast speeds training up. The CPU's flags, not oneDNN, decide: oneDNN
    reports bf16 on any AVX512 CPU and there emulates it, slower than fp32 (README, Results)."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", read_cpuinfo(cpuinfo)) is not None


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """fp16 on CUDA, bf16 on a CPU with native bf16, else None (fp32)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    found = re.search(r"^model name\s*:\s*(.+)$", read_cpuinfo(cpuinfo), re.MULTILINE)
    return found.group(1).strip() if found else f"{platform.processor() or platform.machine()} CPU"


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def resolve_pretrained(model_cfg: dict) -> dict:
    """Turn ``pretrained: imagenet`` into a file path (MobileNetV2 only: its weights can be fetched offline)."""
    if model_cfg.get("pretrained") != "imagenet":
        return model_cfg
    if model_cfg["backbone"] != "mobilenetv2":
        raise ValueError(f"no offline ImageNet weights for {model_cfg['backbone']}: set model.pretrained to a torchvision/timm checkpoint path")
    from model_zoo.pretrained import mobilenetv2_imagenet_weights

    return {**model_cfg, "pretrained": str(mobilenetv2_imagenet_weights())}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def learning_rate(cfg: TrainConfig, epoch: int, iteration: int, iters_per_epoch: int) -> float:
    s = cfg.solver
    if epoch < s.warmup_epochs:
        progress = (epoch * iters_per_epoch + iteration) / max(1, s.warmup_epochs * iters_per_epoch - 1)
        return s.warmup_lr + (s.lr - s.warmup_lr) * min(1.0, progress)
    if s.scheduler == "cosine":
        progress = ((epoch - s.warmup_epochs) * iters_per_epoch + iteration) / max(1, s.epochs * iters_per_epoch)
        return s.lr * (s.final_lr_factor + (1 - s.final_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if s.scheduler == "step":
        return s.lr * s.gamma ** ((epoch - s.warmup_epochs) // s.step_size)
    raise ValueError(f"unknown scheduler {s.scheduler!r}: 'step' or 'cosine'")


def set_trainable(model: torch.nn.Module, classifiers_only: bool) -> None:
    """During the warm-up only the classifiers W^i learn (CAMA 4.2); afterwards everything does."""
    classifiers = {id(p) for p in model.classifier_parameters}
    for param in model.parameters():
        param.requires_grad_(not classifiers_only or id(param) in classifiers)


class Objective:
    """The weighted sum of the loss terms the config switches on; returns the total and every term."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module):
        self.loss_cfg, self.model = cfg.loss, model
        self.id_loss = IdentificationLoss(cfg.loss.label_smoothing)
        use_oap = cfg.model.num_branches > 1 and cfg.loss.alpha > 0
        self.oap = OverlappedActivationPenalty(cfg.loss.k, cfg.loss.oap_mode) if use_oap else None
        self.triplet = BatchHardTripletLoss(cfg.loss.triplet_margin) if cfg.loss.triplet_weight > 0 else None

    def __call__(self, out, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        zero = out.logits.new_zeros((), dtype=torch.float32)
        terms = {
            "loss_id": self.id_loss(out.logits, targets),
            "loss_oap": self.oap(self.model.target_activation_maps(out.feature_maps, targets)) if self.oap else zero,
            "loss_tri": self.triplet(branch_features(out.feature_maps), targets) if self.triplet else zero,
        }
        total = terms["loss_id"] + self.loss_cfg.alpha * terms["loss_oap"] + self.loss_cfg.triplet_weight * terms["loss_tri"]
        return total, terms


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
        self.model = build_model(resolve_pretrained(asdict(cfg.model)), self.dataset.num_classes).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.objective = Objective(cfg, self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.solver.lr, weight_decay=cfg.solver.weight_decay)
        self.autocast_dtype = autocast_dtype(self.device, cfg.run.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.augment = TrainAugmentation(d.flip_prob, d.padding, d.color_jitter, d.color_jitter_prob, d.grayscale_prob, d.erasing_prob)
        self.sampler = self._sampler()
        self.eval_roots = list(cfg.run.eval_roots) or test_roots(d.roots)
        self.start_epoch = 0
        self.history: List[Dict] = []

    def _sampler(self):
        d = self.cfg.data
        per_source = self.dataset.source_weights(d.source_weights)
        if d.sampler == "pk":
            identity_weights = np.zeros(self.dataset.num_classes)
            identity_weights[self.dataset.labels] = per_source[self.dataset.sources]
            return PKSampler(self.dataset.labels, d.batch_size, d.num_instances, self.generator, identity_weights)
        if d.sampler == "random":
            weights = None if not d.source_weights else per_source[self.dataset.sources]
            return RandomBatchSampler(len(self.dataset), d.batch_size, self.generator, weights)
        raise ValueError(f"unknown sampler {d.sampler!r}: 'random' or 'pk'")

    @property
    def total_epochs(self) -> int:
        return self.cfg.solver.warmup_epochs + self.cfg.solver.epochs

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model(images)
            loss, terms = self.objective(out, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        accuracy = (out.logits.argmax(-1) == targets.unsqueeze(1)).float().mean()
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "acc": accuracy.item()}

    def iterations_per_epoch(self) -> int:
        iters = len(self.sampler)
        return min(iters, self.cfg.solver.max_iters_per_epoch) if self.cfg.solver.max_iters_per_epoch else iters

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        set_trainable(self.model, classifiers_only=epoch < self.cfg.solver.warmup_epochs)
        iters = self.iterations_per_epoch()
        loader = batch_loader(self.dataset, self.augment, self.sampler, self.generator, iters, self.cfg.data.workers, self.device.type == "cuda")
        sums: Dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{self.total_epochs}", disable=not self.cfg.run.progress)
        for iteration, (images, targets) in enumerate(loader):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.cfg, epoch, iteration, iters)
            stats = self._step(images, targets)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            seen += len(targets)
            bar.set_postfix(id=f"{stats['loss_id']:.3f}", oap=f"{stats['loss_oap']:.3f}", tri=f"{stats['loss_tri']:.3f}",
                            acc=f"{stats['acc']:.2f}", lr=f"{self.optimizer.param_groups[0]['lr']:.1e}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        return {"epoch": epoch + 1, **{k: v / max(1, iters) for k, v in sums.items()}, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": seen / seconds, "seconds": seconds}

    def evaluate(self) -> Dict[str, Dict]:
        d = self.cfg.data
        return evaluate_sets(self.model, self.eval_roots, d.height, d.width, self.device, self.cfg.run.progress)

    def save(self, epoch: int, name: str = LAST_CHECKPOINT) -> Path:
        path = self.out / name
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "config": self.cfg.to_dict(), "num_classes": self.dataset.num_classes,
            "generator": self.generator.get_state(), "history": self.history,
        }
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return path

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.history = state["history"]
        self.start_epoch = state["epoch"] + 1
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def fit(self) -> Dict:
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        started = time.perf_counter()
        every = self.cfg.run.eval_every
        for epoch in range(self.start_epoch, self.total_epochs):
            record = self.train_epoch(epoch)
            if every and (epoch + 1) % every == 0 and epoch + 1 < self.total_epochs:
                record["evaluation"] = self.evaluate()
            self.history.append(record)
            if (epoch + 1) % self.cfg.run.checkpoint_every == 0 or epoch + 1 == self.total_epochs:
                self.save(epoch)
        self.save(self.total_epochs - 1, FINAL_CHECKPOINT)
        summary = {
            "config": self.cfg.to_dict(), "history": self.history, "hardware": hardware_description(self.device),
            "precision": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            "train_seconds_this_session": time.perf_counter() - started,
            "train_seconds_total": sum(h["seconds"] for h in self.history),
            "num_classes": self.dataset.num_classes, "num_train_images": len(self.dataset),
            "sources": self.dataset.describe_sources(),
            "bad_files": self.dataset.bad_files, "unnamed_files": self.dataset.unnamed,
        }
        if self.cfg.run.evaluate_at_end:
            summary["evaluation"] = self.evaluate()
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(cfg: TrainConfig, resume: Optional[Path] = None) -> Dict:
    """Train as ``cfg`` says; with ``resume``, continue from that checkpoint. Returns the run summary."""
    trainer = Trainer(cfg)
    if resume:
        trainer.resume(Path(resume))
    return trainer.fit()


def load_trained_model(checkpoint: Path, device: str = "cpu") -> Tuple[torch.nn.Module, TrainConfig]:
    """The model of a training checkpoint, in eval mode, and its config."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg = from_dict(TrainConfig, state["config"])
    model_cfg = {**asdict(cfg.model), "pretrained": None}
    model = build_model(model_cfg, state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
