"""Training throughput of the multi-source recipe (``pool.yaml``) on this machine, variant by variant, side by
side in one run: fp32 against bf16 autocast, IBN-a on and off, channels_last, the data loader inline against
one worker process.

Each variant is a real ``Trainer`` on a synthetic Market-layout folder (random images, so only speed is
measured), timing full-model epochs of ``--iters`` batches. Variants take turns in rounds and each round's
speed is divided by the baseline's in the same round, because this machine's speed drifts; medians reported.

    python -m bench.training_speed --output bench/results/training_speed.json
    python -m bench.training_speed --size 256 128 --variants baseline bf16 --output ...   # the papers' input size
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import emit
from model_zoo.provenance import provenance
from training import load_config
from training.engine import Trainer, cpu_has_native_bf16, hardware_description

BF16 = {"run.amp": "true", "run.force_cpu_bf16": "true"}
VARIANTS = {  # name: (what it is, its overrides of the baseline); the baseline comes first
    "baseline": ("fp32, IBN-a, loader inline", {}),
    "bf16": ("bf16 autocast", BF16),
    "bf16_channels_last": ("bf16 autocast, channels_last", {**BF16, "run.channels_last": "true"}),
    "no_ibn": ("no IBN-a", {"model.ibn": "false"}),
    "channels_last": ("channels_last", {"run.channels_last": "true"}),
    "loader_worker": ("loader in 1 worker process", {"data.workers": 1}),
}


def write_folder(root: Path, identities: int, per_identity: int, height: int, width: int) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "synthetic" / "bounding_box_train"
    folder.mkdir(parents=True)
    for pid in range(identities):
        for i in range(per_identity):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{pid:04d}_c{1 + i % 2}s1_{pid * per_identity + i:06d}_00.jpg")
    return folder.parent


def trainer_for(root: Path, out: Path, overrides: dict, threads: int, size: tuple) -> Trainer:
    values = {
        "data.roots": f"[{root}]",
        "data.source_weights": "{}",
        "model.pretrained": "null",
        "data.height": size[0],
        "data.width": size[1],
        "run.output_dir": str(out),
        "run.progress": "false",
        "run.threads": threads,
        "run.amp": "false",
    }
    values.update(overrides)
    return Trainer(load_config("pool.yaml", [f"{k}={v}" for k, v in values.items()]))


def images_per_second(trainer: Trainer, iters: int) -> float:
    trainer.cfg.solver.max_iters_per_epoch = iters
    start = time.perf_counter()
    trainer.train_epoch(trainer.cfg.solver.warmup_epochs)
    return iters * trainer.cfg.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="batches of 64 per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[128, 64],
        metavar=("HEIGHT", "WIDTH"),
        help="input size (pool.yaml's by default)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="the first is the baseline of the ratios",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), identities=64, per_identity=8, height=args.size[0], width=args.size[1])
        trainers = {
            name: trainer_for(root, Path(tmp) / name, VARIANTS[name][1], args.threads, args.size)
            for name in args.variants
        }
        for trainer in trainers.values():
            images_per_second(trainer, 2)  # warm-up: allocator, oneDNN kernels, worker start
        speeds = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                speeds[name].append(images_per_second(trainer, args.iters))
    baseline = speeds[args.variants[0]]
    results = {
        **provenance(),
        "hardware": hardware_description(torch.device("cpu")),
        "native_bf16": cpu_has_native_bf16(),
        "batch": f"64 (16 ids x 4), {args.size[0]}x{args.size[1]}, CAMA N=3 MobileNetV2, pool.yaml losses",
        "variants": {
            name: {
                "what": VARIANTS[name][0],
                "images_per_second_median": statistics.median(s),
                "ratio_to_baseline_median": statistics.median(a / b for a, b in zip(s, baseline)),
                "rounds": s,
            }
            for name, s in speeds.items()
        },
    }
    for figures in results["variants"].values():
        print(
            f"{figures['what']:40s} {figures['images_per_second_median']:6.1f} img/s  "
            f"x{figures['ratio_to_baseline_median']:.2f}"
        )
    emit(results, args.output)


if __name__ == "__main__":
    main()
