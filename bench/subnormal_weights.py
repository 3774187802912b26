"""Subnormal weights in exported models: how many, and what zeroing them does to the embeddings and the speed.

x86 CPUs multiply subnormal floats (magnitude below float32's smallest normal number, 1.2e-38) in microcode,
far slower than normal ones, and weight decay over a long schedule leaves thousands of weights there. The
exporter now zeroes them (``training.export.zero_subnormal_weights``); files exported before it did still
hold them. For each model: its count of subnormal float32 weights, a copy with them zeroed, the largest
difference between the two files' embeddings on a random batch, and their images/s side by side through ONNX
Runtime (``embed_speed.measure``: the two alternate in rounds, the ratio is the median of the rounds' ratios).

    python bench/subnormal_weights.py model_zoo/models/cama_mobilenetv2_cuhk03.onnx --zeroed-dir /tmp/zeroed \
        --output bench/results/subnormal_weights.json

``--zeroed-dir`` keeps the zeroed copies (MODEL.subnormals_zeroed.onnx) for other benchmarks, such as
``embed_speed.py`` against further models.
"""
import argparse
import json
import platform
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embed_speed import add_speed_arguments, measure, session_for  # noqa: E402
from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, check_session  # noqa: E402
from training.export import zero_subnormal_weights  # noqa: E402


def largest_embedding_difference(a: Path, b: Path, batch_size: int) -> float:
    sessions = [session_for(path, 1) for path in (a, b)]
    contract = check_session(sessions[0])
    images = np.random.default_rng(0).integers(0, 256, (batch_size, contract.input_height, contract.input_width, 3), dtype=np.uint8)
    first, second = (s.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: images})[0] for s in sessions)
    return float(np.abs(first - second).max())


def compare(model: Path, threads: list, rounds: int, seconds: float, batch_size: int, work: Path) -> dict:
    proto = onnx.load(str(model))
    zeroed = zero_subnormal_weights(proto)
    copy = work / f"{model.stem}.subnormals_zeroed.onnx"
    onnx.save(proto, str(copy))
    speeds = {threads_: measure([model, copy], threads_, rounds, seconds, batch_size) for threads_ in threads}
    return {
        "subnormal_weights": zeroed,
        "max_embedding_difference": largest_embedding_difference(model, copy, batch_size),
        "images_per_second": {t: {"as_is": s[str(model)]["images_per_second_median"], "zeroed": s[str(copy)]["images_per_second_median"],
                                  "ratio_median": s[str(copy)]["ratio_to_first_median"],
                                  "rounds_as_is": s[str(model)]["rounds"], "rounds_zeroed": s[str(copy)]["rounds"]} for t, s in speeds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="exported .onnx files")
    add_speed_arguments(parser, rounds=4, seconds=4.0)
    parser.add_argument("--zeroed-dir", type=Path, default=None, help="keep the zeroed copies here (default: a temporary folder, removed)")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()} {platform.processor()}", "onnxruntime": ort.__version__, "batch_size": args.batch_size, "models": {}}
    if args.zeroed_dir:
        args.zeroed_dir.mkdir(parents=True, exist_ok=True)
    with nullcontext(args.zeroed_dir) if args.zeroed_dir else tempfile.TemporaryDirectory() as work:
        for model in args.models:
            figures = compare(model, args.threads, args.rounds, args.seconds, args.batch_size, Path(work))
            results["models"][str(model)] = figures
            for threads, speed in figures["images_per_second"].items():
                print(f"{model.name}: {figures['subnormal_weights']} subnormal weights, embeddings differ by at most "
                      f"{figures['max_embedding_difference']:.1e}; {threads} thread(s): {speed['as_is']:.1f} -> {speed['zeroed']:.1f} img/s "
                      f"(x{speed['ratio_median']:.2f})")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
