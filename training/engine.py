"""The training loop: warm-up of the classifiers, then the whole model; checkpoints, resume, run folder."""
import json
import logging
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import yaml
from tqdm import tqdm

from model_zoo.architectures import build_model
from training.config import TrainConfig, from_dict
from training.data import MarketDataset, PKSampler, RandomBatchSampler, TrainAugmentation
from training.evaluation import evaluate_model
from training.losses import IdentificationLoss, OverlappedActivationPenalty

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


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
    return s.lr * s.gamma ** ((epoch - s.warmup_epochs) // s.step_size)


def set_trainable(model: torch.nn.Module, classifiers_only: bool) -> None:
    """During the warm-up only the classifiers W^i learn (CAMA 4.2); afterwards everything does."""
    classifiers = {id(p) for p in model.classifier_parameters}
    for param in model.parameters():
        param.requires_grad_(not classifiers_only or id(param) in classifiers)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.generator = seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg.run.device)
        if cfg.data.root is None:
            raise ValueError("data.root is not set: point it at a Market-1501-layout folder")
        self.dataset = MarketDataset(cfg.data.root, cfg.data.height, cfg.data.width, cfg.data.cache_images, cfg.run.progress)
        self.model = build_model(resolve_pretrained(asdict(cfg.model)), self.dataset.num_classes).to(self.device)
        self.id_loss = IdentificationLoss()
        self.oap = OverlappedActivationPenalty(cfg.loss.k) if cfg.model.num_branches > 1 and cfg.loss.alpha > 0 else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.solver.lr, weight_decay=cfg.solver.weight_decay)
        self.amp = cfg.run.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = TrainAugmentation(cfg.data.flip_prob, cfg.data.padding)
        self.sampler = self._sampler()
        self.start_epoch = 0
        self.history = []

    def _sampler(self):
        d = self.cfg.data
        if d.sampler == "pk":
            return PKSampler(self.dataset.labels, d.batch_size, d.num_instances, self.generator)
        if d.sampler == "random":
            return RandomBatchSampler(len(self.dataset), d.batch_size, self.generator)
        raise ValueError(f"unknown sampler {d.sampler!r}: 'random' or 'pk'")

    @property
    def total_epochs(self) -> int:
        return self.cfg.solver.warmup_epochs + self.cfg.solver.epochs

    def _batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.stack([self.dataset.image(i) for i in indices]))
        images = self.augment(images, self.generator).to(self.device, non_blocking=True)
        return images, torch.from_numpy(self.dataset.labels[indices]).to(self.device)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        with torch.autocast(self.device.type, enabled=self.amp):
            out = self.model(images)
            loss_id = self.id_loss(out.logits, targets)
            loss_oap = self.oap(self.model.target_activation_maps(out.feature_maps, targets)) if self.oap else torch.zeros((), device=self.device)
            loss = loss_id + self.cfg.loss.alpha * loss_oap
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        accuracy = (out.logits.argmax(-1) == targets.unsqueeze(1)).float().mean()
        return {"loss": loss.item(), "loss_id": loss_id.item(), "loss_oap": loss_oap.item(), "acc": accuracy.item()}

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        set_trainable(self.model, classifiers_only=epoch < self.cfg.solver.warmup_epochs)
        iters = len(self.sampler)
        if self.cfg.solver.max_iters_per_epoch:
            iters = min(iters, self.cfg.solver.max_iters_per_epoch)
        sums: Dict[str, float] = {}
        seen, start = 0, time.perf_counter()
        bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{self.total_epochs}", disable=not self.cfg.run.progress)
        for iteration, indices in zip(range(iters), self.sampler):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.cfg, epoch, iteration, iters)
            stats = self._step(*self._batch(indices))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            seen += len(indices)
            bar.set_postfix(loss_id=f"{stats['loss_id']:.3f}", loss_oap=f"{stats['loss_oap']:.3f}", acc=f"{stats['acc']:.2f}",
                            lr=f"{self.optimizer.param_groups[0]['lr']:.1e}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        return {"epoch": epoch + 1, **{k: v / max(1, iters) for k, v in sums.items()}, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": seen / seconds, "seconds": seconds}

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
        for epoch in range(self.start_epoch, self.total_epochs):
            self.history.append(self.train_epoch(epoch))
            if (epoch + 1) % self.cfg.run.checkpoint_every == 0 or epoch + 1 == self.total_epochs:
                self.save(epoch)
        self.save(self.total_epochs - 1, FINAL_CHECKPOINT)
        summary = {
            "config": self.cfg.to_dict(), "history": self.history, "hardware": hardware_description(self.device),
            "train_seconds_this_session": time.perf_counter() - started,
            "train_seconds_total": sum(h["seconds"] for h in self.history),
            "num_classes": self.dataset.num_classes, "num_train_images": len(self.dataset),
            "bad_files": self.dataset.bad_files, "unnamed_files": self.dataset.unnamed,
        }
        if self.cfg.run.evaluate_at_end:
            summary["evaluation"] = evaluate_model(self.model, self.cfg.data.root, self.cfg.data.height, self.cfg.data.width, self.device, self.cfg.run.progress)
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
