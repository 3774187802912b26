"""Embedding throughput of exported models through ONNX Runtime on this CPU, side by side in one run.

The models take turns in rounds (A, B, A, B, ...) and each round's speed is divided by the first model's in
the same round, because this machine's speed drifts over minutes; the median ratio is the figure reported.
Batch 32 of random uint8 images at each model's own input size, one ONNX Runtime call at a time with
``--threads`` threads.

    python -m bench.embed_speed model_zoo/models/person_reidentification_retail_0277.onnx \
        model_zoo/models/person_reidentification_retail_0288.onnx --output OUT.json

(bench/results/embed_speed.json compared the two CAMA files their cards in model_zoo/models make.)
"""

import argparse
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import emit, rate
from model_zoo.contract import INPUT_IMAGES, check_session
from model_zoo.provenance import portable_path, provenance


def session_for(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(paths, threads: int, rounds: int, seconds: float, batch_size: int) -> dict:
    sessions, batches = [], []
    rng = np.random.default_rng(0)
    for path in paths:
        session = session_for(path, threads)
        contract = check_session(session)
        sessions.append(session)
        batches.append(
            rng.integers(0, 256, (batch_size, contract.input_height, contract.input_width, 3), dtype=np.uint8)
        )
    speeds = [[] for _ in paths]
    for _ in range(rounds):
        for i, (session, batch) in enumerate(zip(sessions, batches)):
            speeds[i].append(rate(lambda: session.run(None, {INPUT_IMAGES: batch}), len(batch), seconds))
    return {
        portable_path(str(path)): {
            "input": list(batch.shape[1:3]),
            "images_per_second_median": statistics.median(s),
            "ratio_to_first_median": statistics.median(a / b for a, b in zip(s, speeds[0])),
            "rounds": s,
        }
        for path, batch, s in zip(paths, batches, speeds)
    }


def add_speed_arguments(parser: argparse.ArgumentParser, rounds: int, seconds: float) -> None:
    """The arguments of a side-by-side speed measurement (``measure``) and its JSON output."""
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime intra-op threads, one measurement each"
    )
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=seconds, help="per model per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="exported .onnx files; ratios are to the first")
    add_speed_arguments(parser, rounds=5, seconds=5.0)
    args = parser.parse_args()
    results = {
        **provenance(),
        "onnxruntime": ort.__version__,
        "batch_size": args.batch_size,
        "threads": {},
    }
    for threads in args.threads:
        results["threads"][threads] = measure(args.models, threads, args.rounds, args.seconds, args.batch_size)
        for path, figures in results["threads"][threads].items():
            print(
                f"{threads} thread(s)  {Path(path).name:45s} {figures['input']}  "
                f"{figures['images_per_second_median']:7.1f} img/s  x{figures['ratio_to_first_median']:.2f}"
            )
    emit(results, args.output)


if __name__ == "__main__":
    main()
