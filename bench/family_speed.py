"""CPU embedding speed of every architecture of the family, side by side with a reference model.

Speed does not depend on the weights, so each architecture is exported from its multi-source config
(``*_pool.yaml``: MobileNetV2 with IBN-a, 128x64, the pool's 1,462 classes) with ImageNet weights and untrained
heads, through the normal exporter (with its parity check), then ``embed_speed.measure`` runs them in
alternating rounds; ratios are to the first model, the reference (``--reference``, by default the shipped
default; its key in the file is "reference", its path ``reference_model``).

    python -m bench.family_speed --reference model_zoo/models/cama_mobilenetv2_pool.onnx --threads 1 \
        --output bench/results/family_speed.json
"""

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from bench.common import emit
from bench.embed_speed import measure
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.architectures import build_model
from model_zoo.provenance import portable_path, provenance
from training import export, load_config
from training.checkpoints import model_settings
from training.engine import resolve_pretrained

POOL_CLASSES = 1462
ROWS = {  # name: (config, overrides)
    "ide_bn": ("pool.yaml", ["model.num_branches=1"]),
    "cama": ("pool.yaml", []),
    "fmn": ("fmn_pool.yaml", []),
    "pmm": ("pmm_pool.yaml", []),
    "casn": ("casn_pool.yaml", []),
    "casn_pcb": ("casn_pool.yaml", ["model.layout=pcb"]),
    "clpd": ("clpd_pool.yaml", []),
}


def untrained_export(name: str, config: str, overrides: list, folder: Path) -> Path:
    """The architecture, untrained, through a checkpoint and the exporter as a trained one would go."""
    cfg = load_config(config, overrides)
    model = build_model(resolve_pretrained(model_settings(cfg)), POOL_CLASSES)
    checkpoint = folder / f"{name}.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": POOL_CLASSES}, checkpoint)
    export(checkpoint, folder / f"{name}.onnx")
    return folder / f"{name}.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=DEFAULT_MODEL_PATH, help="the model ratios are to")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    rows = {name: row for name, row in ROWS.items() if (configs / row[0]).exists()}
    with tempfile.TemporaryDirectory() as folder:
        paths = [args.reference, *(untrained_export(name, *row, Path(folder)) for name, row in rows.items())]
        names = ["reference", *rows]
        results = {
            **provenance(),
            "onnxruntime": ort.__version__,
            "reference_model": portable_path(str(args.reference)),
            "threads": {},
        }
        for threads in args.threads:
            figures = measure(paths, threads, args.rounds, args.seconds, 32)
            results["threads"][threads] = {
                name: {k: v for k, v in f.items() if k != "rounds"} for name, f in zip(names, figures.values())
            }
            for name, f in results["threads"][threads].items():
                print(
                    f"{threads} thread(s)  {name:18s} {f['input']}  {f['images_per_second_median']:7.1f} img/s  "
                    f"x{f['ratio_to_first_median']:.2f}"
                )
    emit(results, args.output)


if __name__ == "__main__":
    main()
