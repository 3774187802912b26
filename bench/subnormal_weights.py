"""Subnormal weights in exported models: how many, and what zeroing them does to the embeddings and the speed.

x86 CPUs multiply subnormal floats (magnitude below float32's smallest normal number, 1.2e-38) in microcode,
far slower than normal ones, and weight decay over a long schedule leaves thousands of weights there. The
exporter now zeroes them (``model_zoo.onnx_export.zero_subnormal_weights``); files exported before it did still
hold them. For each model: its count of subnormal float32 weights, a copy with them zeroed, the largest
difference between the two files' embeddings on a random batch, and their images/s side by side through ONNX
Runtime (``embed_speed.measure``: the two alternate in rounds, the ratio is the median of the rounds' ratios).
(cama_mobilenetv2_cuhk03.onnx: the file its card, model_zoo/models/cama_mobilenetv2_cuhk03.md, makes.)

    python -m bench.subnormal_weights cama_mobilenetv2_cuhk03.onnx --zeroed-dir /tmp/zeroed \
        --output bench/results/subnormal_weights.json
    python -m bench.subnormal_weights --checkpoint $RUNS/cama_ordered_full/model.pt --output \
        bench/results/subnormal_training.json

``--checkpoint``: the same for training instead, on a training checkpoint (RUN/model.pt): its subnormal
parameters and buffers, and the images/s of a training step (forward and backward, a batch of random images at
its input size) as it is and with them zeroed (``training.solver.zero_subnormals``, which the trainer now
applies every 50 steps on a CPU), alternating in rounds.

``--zeroed-dir`` keeps the zeroed copies (MODEL.subnormals_zeroed.onnx) for other benchmarks, such as
``embed_speed.py`` against further models.
"""

import argparse
import copy
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.common import emit, rate
from bench.embed_speed import add_speed_arguments, measure, session_for
from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, check_session
from model_zoo.provenance import portable_path, provenance
from training.checkpoints import load_trained_model
from model_zoo.onnx_export import zero_subnormal_weights
from training.solver import SMALLEST_NORMAL, zero_subnormals


def largest_embedding_difference(a: Path, b: Path, batch_size: int) -> float:
    sessions = [session_for(path, 1) for path in (a, b)]
    contract = check_session(sessions[0])
    images = np.random.default_rng(0).integers(
        0, 256, (batch_size, contract.input_height, contract.input_width, 3), dtype=np.uint8
    )
    first, second = (s.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: images})[0] for s in sessions)
    return float(np.abs(first - second).max())


def compare(model: Path, threads: list, rounds: int, seconds: float, batch_size: int, work: Path) -> dict:
    proto = onnx.load(str(model))
    zeroed = zero_subnormal_weights(proto)
    zeroed_file = work / f"{model.stem}.subnormals_zeroed.onnx"
    onnx.save(proto, str(zeroed_file))
    speeds = {threads_: measure([model, zeroed_file], threads_, rounds, seconds, batch_size) for threads_ in threads}
    as_is, repaired = portable_path(str(model)), portable_path(str(zeroed_file))  # embed_speed's keys
    return {
        "subnormal_weights": zeroed,
        "max_embedding_difference": largest_embedding_difference(model, zeroed_file, batch_size),
        "images_per_second": {
            t: {
                "as_is": s[as_is]["images_per_second_median"],
                "zeroed": s[repaired]["images_per_second_median"],
                "ratio_median": s[repaired]["ratio_to_first_median"],
                "rounds_as_is": s[as_is]["rounds"],
                "rounds_zeroed": s[repaired]["rounds"],
            }
            for t, s in speeds.items()
        },
    }


def training_steps_per_second(model: torch.nn.Module, images: torch.Tensor, seconds: float) -> float:
    """Images/s of forward + backward (the summed logsumexp of the logits as the loss), the model in train mode."""

    def step():
        loss = sum(logits.logsumexp(1).mean() for logits in model(images).logits)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    return rate(step, len(images), seconds)


def compare_training(checkpoint: Path, threads: int, rounds: int, seconds: float, batch_size: int) -> dict:
    model, cfg = load_trained_model(checkpoint)
    zeroed = copy.deepcopy(model)
    # counted here, not by zero_subnormals: counting would double the cost of the trainer's pass
    before = sum(
        int(((t != 0) & (t.abs() < SMALLEST_NORMAL)).sum())
        for t in [*model.parameters(), *model.buffers()]
        if t.dtype == torch.float32
    )
    zero_subnormals(zeroed, None)
    images = torch.randint(0, 256, (batch_size, cfg.data.height, cfg.data.width, 3), dtype=torch.uint8)
    speeds = {"as_is": [], "zeroed": []}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(rounds):
            speeds["as_is"].append(training_steps_per_second(model, images, seconds))
            speeds["zeroed"].append(training_steps_per_second(zeroed, images, seconds))
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "subnormal_values": before,
        "threads": threads,
        "rounds": speeds,
        "ratio_median": statistics.median(z / a for z, a in zip(speeds["zeroed"], speeds["as_is"])),
    }


def report_training(args) -> dict:
    figures = {
        t: compare_training(args.checkpoint, t, args.rounds, args.seconds, args.batch_size) for t in args.threads
    }
    for t, f in figures.items():
        print(
            f"{args.checkpoint}: {f['subnormal_values']} subnormal values; a training step on {t} thread(s) "
            f"x{f['ratio_median']:.2f} with them zeroed"
        )
    return figures


def report_exports(args) -> dict:
    if args.zeroed_dir:
        args.zeroed_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with nullcontext(args.zeroed_dir) if args.zeroed_dir else tempfile.TemporaryDirectory() as work:
        for model in args.models:
            figures = results[str(model)] = compare(
                model, args.threads, args.rounds, args.seconds, args.batch_size, Path(work)
            )
            for threads, speed in figures["images_per_second"].items():
                print(
                    f"{model.name}: {figures['subnormal_weights']} subnormal weights, embeddings differ by at most "
                    f"{figures['max_embedding_difference']:.1e}; {threads} thread(s): {speed['as_is']:.1f} -> "
                    f"{speed['zeroed']:.1f} img/s "
                    f"(x{speed['ratio_median']:.2f})"
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="exported .onnx files")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="a training checkpoint: measure a training step instead"
    )
    add_speed_arguments(parser, rounds=4, seconds=4.0)
    parser.add_argument(
        "--zeroed-dir",
        type=Path,
        default=None,
        help="keep the zeroed copies here (default: a temporary folder, removed)",
    )
    args = parser.parse_args()
    results = {
        **provenance(),
        "onnxruntime": ort.__version__,
        "batch_size": args.batch_size,
        "models": report_exports(args),
    }
    if args.checkpoint:
        results["training"] = report_training(args)
    emit(results, args.output)


if __name__ == "__main__":
    main()
