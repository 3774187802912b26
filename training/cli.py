"""``python -m training train|evaluate|export``: a thin layer over the Python API in ``training``."""
import argparse
import json
import logging
from pathlib import Path

from training.config import describe_options, load_config


def _train(args) -> None:
    from training.engine import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    from training.evaluation import results_table

    print(f"run {cfg.run.output_dir}: {summary['train_seconds_total'] / 60:.1f} min of training")
    if summary.get("evaluation"):
        print(results_table(summary["evaluation"]))


def _evaluate(args) -> None:
    from training.evaluation import evaluate_checkpoint, results_table

    results = evaluate_checkpoint(args.checkpoint, args.data_root, args.device, progress=not args.quiet)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    print(results_table(results))


def _export(args) -> None:
    from training.export import export_onnx

    report = export_onnx(args.checkpoint, args.output, args.real_images, args.metrics, args.opset)
    print(json.dumps({k: report[k] for k in ("output", "bytes", "parity")}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, evaluate and export re-ID models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model. Settings come from --config (YAML, may layer a _base_ file) and then from\n"
        "section.key=value overrides, e.g. data.roots=[/data/market] solver.epochs=30. Every key:\n\n" + describe_options(),
    )
    train.add_argument("--config", type=Path, default=Path("base.yaml"), help="YAML config (a path, or a name in training/configs/); default base.yaml, the paper's schedule")
    train.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint (e.g. RUN/last.pt)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, values parsed as YAML (lists too: data.roots=[a,b])")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint or an exported .onnx with the single-query Market protocol, one table row per set")
    evaluate.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN/model.pt) or an exported .onnx file (needs --data-root)")
    evaluate.add_argument("--data-root", type=Path, action="append", default=None, help="Market-layout folder with query and bounding_box_test; repeat for several sets (default for a checkpoint: the sets its training evaluated)")
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    evaluate.add_argument("--output", type=Path, default=None, help="also write every figure to this JSON file, keyed by set")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser("export", help="export a checkpoint to ONNX (the service's contract) with a parity check")
    export.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN/model.pt)")
    export.add_argument("output", type=Path, help="the .onnx file to write")
    export.add_argument("--real-images", type=Path, default=None, help="folder of images for the parity check (default: the training data's query folder)")
    export.add_argument("--metrics", type=Path, default=None, help="metrics.json whose evaluation goes into the metadata (default: RUN/metrics.json)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    export.set_defaults(run=_export)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='{"level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}')
    args.run(args)
