"""Raw embedding throughput on a GPU host: by model file (fp32, fp16), provider (TensorRT, CUDA), batch size and
IO binding, in one run (not a test; prepared for a lent GPU, where it has not run yet).

Each (file, provider) is loaded as the service loads it (service.inference.InferenceModel with
REID_EXECUTION_PROVIDER set to it: TensorRT's profile for batches up to the largest measured, its engine cache
in ``--work``; one call at a time); a provider that falls back (to CUDA or the CPU) is reported with the
service's own message, never measured as the one asked for. Per batch size, images/s of one call at a time with plain
``run`` (pixels copied from host memory, both
outputs back to it, as the service runs) and with IO binding (the pixels copied to the device once, the
outputs left there: what a pipeline keeping tensors on the GPU would see); random uint8 images at the file's
input size. Where ONNX Runtime offers neither GPU provider it measures the CPU, which is how it is tested.

    python -m training fp16 model_zoo/models/person_reidentification_retail_0277.onnx --data-root $DATA/cuhk03-detected
    python -m bench.gpu_embed model_zoo/models/person_reidentification_retail_0277.onnx \
        model_zoo/models/person_reidentification_retail_0277.fp16.onnx \
        --work /tmp/gpu-bench --output bench/results/gpu_embed.json
"""

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import emit, rate
from model_zoo.contract import INPUT_IMAGES
from model_zoo.provenance import provenance
from service.inference import CPU, CUDA, TENSORRT, InferenceModel, ProviderUnavailable

BATCHES = (1, 8, 32, 64, 128, 256)
PROVIDERS = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}  # REID_EXECUTION_PROVIDER value: the provider it asks for


def bound_call(session: ort.InferenceSession, batch: np.ndarray, device: str):
    """A run with IO binding: the input copied to ``device`` once, the outputs allocated there."""
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_IMAGES, ort.OrtValue.ortvalue_from_numpy(batch, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    return lambda: session.run_with_iobinding(binding)


def measure(path: Path, provider: str, batches, seconds: float, work: Path) -> dict:
    try:
        model = InferenceModel(
            path, provider, instances=1, tensorrt_cache=work / f"trt-{path.stem}", max_batch=max(batches)
        ).load()
    except ProviderUnavailable as fell_back:
        return {"asked": PROVIDERS[provider], "fell_back": True, "error": str(fell_back)}
    session, contract, active = model.session, model.contract, model.providers.active
    device = "cpu" if active == CPU else "cuda"
    rng = np.random.default_rng(0)
    rows = {}
    for size in batches:
        batch = rng.integers(0, 256, (size, contract.input_height, contract.input_width, 3), dtype=np.uint8)
        rows[str(size)] = {
            "run_images_per_s": round(rate(lambda: session.run(None, {INPUT_IMAGES: batch}), size, seconds), 1),
            "io_binding_images_per_s": round(rate(bound_call(session, batch, device), size, seconds), 1),
        }
        print(path.name, active, size, rows[str(size)], flush=True)
    return {"asked": PROVIDERS[provider], "active": active, "fell_back": False, "by_batch": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="+", type=Path, help="exported files: the fp32 file and its fp16 (or int8) file"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=sorted(PROVIDERS),
        default=["tensorrt", "cuda"],
        help="those ONNX Runtime offers are measured; none offered: the CPU",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/reid-gpu-bench"), help="TensorRT's engine caches go here"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    offered = ort.get_available_providers()
    providers = [name for name in args.providers if PROVIDERS[name] in offered] or ["cpu"]
    results = {
        **provenance(),
        "onnxruntime": ort.__version__,
        "offered": offered,
        "models": {},
    }
    for path in args.models:
        results["models"][path.name] = {
            name: measure(path, name, args.batches, args.seconds, args.work) for name in providers
        }
    emit(results, args.output)


if __name__ == "__main__":
    main()
