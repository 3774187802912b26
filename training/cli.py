"""``python -m training train|evaluate|export|quantize|fp16|calibrate|adapt``: a thin layer over the Python API in
``training``."""

import argparse
import json
import logging
from pathlib import Path

from model_zoo.rerank import DEFAULT_K1, DEFAULT_K2, DEFAULT_LAMBDA
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
    from training.evaluation import Rerank, evaluate_checkpoint, results_table

    rerank = None if args.rerank == "off" else Rerank(args.rerank, args.k1, args.k2, args.lambda_value)
    results = evaluate_checkpoint(
        args.checkpoint, args.data_root, args.device, progress=not args.quiet, rerank=rerank, pair_head=args.pair_head
    )
    if args.output:
        Path(args.output).write_text(json.dumps(_evaluation_record(args, results), indent=2) + "\n")
    print(results_table(results))


def _evaluation_record(args, results: dict) -> dict:
    """What ``evaluate --output`` writes: where the figures came from (commit, command, date, machine), the model
    and its sha256, each set's fingerprint, and the figures under ``evaluation`` (as a run's metrics.json has
    them), so the file can go into bench/results as it is."""
    from model_zoo.files import sha256_of
    from model_zoo.provenance import data_fingerprint, provenance

    return {
        **provenance(),
        "model": Path(args.checkpoint).name,
        "model_sha256": sha256_of(args.checkpoint),
        "data": {Path(root).name: data_fingerprint(root) for root in args.data_root or ()},
        "evaluation": results,
    }


def _export(args) -> None:
    from training.export import export_onnx

    report = export_onnx(args.checkpoint, args.output, args.real_images, args.metrics, args.opset, args.flip)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("output", "bytes", "subnormal_weights_zeroed", "parity", "pair_head")
                if k in report
            },
            indent=2,
        )
    )


def _quantize(args) -> None:
    from training.quantize import quantize_model

    summary = quantize_model(
        args.model,
        args.data_root,
        args.output,
        args.calibration_images,
        args.agreement_images,
        args.method,
        not args.per_tensor,
        args.reduce_range,
        args.activations,
        args.exclude_first_conv,
        seed=args.seed,
    )
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def _fp16(args) -> None:
    from training.half_precision import convert_to_fp16

    print(
        json.dumps(convert_to_fp16(args.model, args.data_root, args.output, args.agreement_images, args.seed), indent=2)
    )


def _calibrate(args) -> None:
    from training.calibration import calibrate, onnx_set_embedder, write_verification

    record = calibrate(onnx_set_embedder(args.model, progress=not args.quiet), args.data_root, args.target_fmr)
    if not args.dry_run:
        write_verification(args.model, record)
    print(json.dumps({k: v for k, v in record.items() if k != "roc"}, indent=2))
    print(json.dumps(record["roc"]))


def converted_file_parser(
    commands, name: str, precision: str, description: str, data_use: str
) -> argparse.ArgumentParser:
    """A command that writes MODEL.<precision>.onnx from an fp32 file, with the arguments every such command takes."""
    from training.quantize import DEFAULT_AGREEMENT_IMAGES

    parser = commands.add_parser(name, help=description)
    parser.add_argument("model", type=Path, help="an exported fp32 .onnx file")
    parser.add_argument(
        "--data-root",
        type=Path,
        action="append",
        required=True,
        help=f"Market-layout folder whose bounding_box_train images {data_use} (training data, never "
        f"an evaluation set); repeat for several",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"the {precision} file to write (default: MODEL.{precision}.onnx beside MODEL.onnx, where "
        f"the service looks)",
    )
    parser.add_argument(
        "--agreement-images",
        type=_at_least_one,
        default=DEFAULT_AGREEMENT_IMAGES,
        help=f"training images on which {precision} and fp32 embeddings are compared (default "
        f"{DEFAULT_AGREEMENT_IMAGES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="draw of the training images used (default 0)")
    return parser


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, evaluate and export re-ID models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_train, _add_evaluate, _add_export, _add_quantize, _add_fp16, _add_calibrate, _add_adapt):
        add_command(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model. Settings come from --config (YAML, may layer a _base_ file) and then from\n"
        "section.key=value overrides, e.g. data.roots=[/data/market] solver.epochs=30. Every key:\n\n"
        + describe_options(),
    )
    train.add_argument(
        "--config",
        type=Path,
        default=Path("base.yaml"),
        help="YAML config (a path, or a name in training/configs/); default base.yaml, the paper's schedule",
    )
    train.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint (e.g. RUN/last.pt)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, values parsed as YAML (lists too: data.roots=[a,b])",
    )
    train.set_defaults(run=_train)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a checkpoint or an exported .onnx with the single-query Market protocol, one table row per set",
    )
    evaluate.add_argument(
        "checkpoint",
        type=Path,
        help="a training checkpoint (RUN/model.pt) or an exported .onnx file (needs --data-root)",
    )
    evaluate.add_argument(
        "--data-root",
        type=Path,
        action="append",
        default=None,
        help="Market-layout folder with query and bounding_box_test; repeat for several sets (default for a "
        "checkpoint: the sets its training evaluated)",
    )
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    evaluate.add_argument(
        "--output", type=Path, default=None, help="also write every figure to this JSON file, keyed by set"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.add_argument(
        "--pair-head",
        type=Path,
        default=None,
        help="CASN: also rank by features + pairwise Siamese attention with this pair-head artifact "
        "(MODEL.pair_head.npz, beside the .onnx file; key all_pair)",
    )
    evaluate.add_argument(
        "--rerank",
        choices=("off", "all", "single"),
        default="off",
        help="also report the whole embedding after k-reciprocal re-ranking (an extra row per set, "
        "key all_rerank): "
        "all = every query and the gallery in one graph (the papers' protocol), single = each query "
        "alone with the "
        "gallery (what the service can do; slower: the gallery's graph is redone per query)",
    )
    evaluate.add_argument(
        "--k1",
        type=_at_least_one,
        default=DEFAULT_K1,
        help=f"re-ranking: k-reciprocal neighbourhood size (default {DEFAULT_K1})",
    )
    evaluate.add_argument(
        "--k2",
        type=_at_least_one,
        default=DEFAULT_K2,
        help=f"re-ranking: local query expansion size (default {DEFAULT_K2})",
    )
    evaluate.add_argument(
        "--lambda-value",
        type=_unit_interval,
        default=DEFAULT_LAMBDA,
        help=f"re-ranking: weight of the original distance, in [0, 1] (default {DEFAULT_LAMBDA})",
    )
    evaluate.set_defaults(run=_evaluate)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX (the service's contract) with a parity check"
    )
    export.add_argument("checkpoint", type=Path, help="a training checkpoint (RUN/model.pt)")
    export.add_argument("output", type=Path, help="the .onnx file to write")
    export.add_argument(
        "--real-images",
        type=Path,
        default=None,
        help="folder of images for the parity check (default: the training data's query folder)",
    )
    export.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics.json whose evaluation goes into the metadata (default: RUN/metrics.json)",
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    export.add_argument(
        "--flip",
        action="store_true",
        help="average each image with its mirror image inside the graph "
        "(test-time flip): "
        "about 1 mAP point more, twice the model's cost (reid.test_time_flip)",
    )
    export.set_defaults(run=_export)


def _add_quantize(commands) -> None:
    from training.quantize import ACTIVATION_TYPES, CALIBRATION_METHODS, DEFAULT_CALIBRATION_IMAGES

    quantize = converted_file_parser(
        commands,
        "quantize",
        "int8",
        "write MODEL.int8.onnx beside an exported model: "
        "static int8 (QDQ), "
        "calibrated on training images, checked against the contract; "
        "REID_MODEL_PRECISION=int8 serves it",
        "calibrate and, on further images, measure the agreement with the fp32 file",
    )
    quantize.add_argument(
        "--calibration-images",
        type=_at_least_one,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"training images drawn for calibration (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    quantize.add_argument(
        "--method",
        choices=CALIBRATION_METHODS,
        default="percentile",
        help="activation range calibration (default percentile: 99.999%% of |x|)",
    )
    quantize.add_argument(
        "--activations",
        choices=ACTIVATION_TYPES,
        default="uint8",
        help="activation type (default uint8: ONNX Runtime's fast x86 path, u8 x s8)",
    )
    quantize.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel"
    )
    quantize.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights (for x86 CPUs without VNNI, where u8 x s8 products can saturate)",
    )
    quantize.add_argument("--exclude-first-conv", action="store_true", help="keep the first convolution in float too")
    quantize.add_argument("--summary", type=Path, default=None, help="also write the summary to this JSON file")
    quantize.set_defaults(run=_quantize)


def _add_fp16(commands) -> None:
    fp16 = converted_file_parser(
        commands,
        "fp16",
        "fp16",
        "write MODEL.fp16.onnx beside an exported model: float16 "
        "for GPUs, the contract's "
        "nodes kept float32, checked against the contract and the fp32 file; "
        "REID_MODEL_PRECISION=fp16 serves it",
        "measure the agreement with the fp32 file",
    )
    fp16.set_defaults(run=_fp16)


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate the same-person threshold (POST /verify, same_person "
        "per match) on "
        "validation data and store it, with its ROC, in the model file's metadata "
        "(reid.verification)",
    )
    calibrate.add_argument(
        "model", type=Path, help="an exported .onnx file (rewritten in place: its fingerprint changes)"
    )
    calibrate.add_argument(
        "--data-root",
        type=Path,
        action="append",
        required=True,
        help="Market-layout folder with query and bounding_box_test: the first calibrates, each "
        "further one is only "
        "checked at that threshold (held_out). Never calibrate on a set you report cross-domain "
        "figures for",
    )
    calibrate.add_argument(
        "--target-fmr",
        type=_unit_interval,
        default=1e-3,
        help="false-match rate the threshold keeps on the first set (default 0.001)",
    )
    calibrate.add_argument("--dry-run", action="store_true", help="print the record, leave the file as it is")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bars")
    calibrate.set_defaults(run=_calibrate)


def _adapt(args) -> None:
    from training.adaptation import adapt, add_evaluation
    from training.evaluation import results_table

    record = adapt(args.model, args.crops, args.output, args.run_dir, args.settings, not args.quiet, args.limit)
    print(
        f"{record['output']}: {record['crops']} crops, {record['cameras']} camera(s); last epoch "
        f"{record['clusters']} clusters, {record['outliers']} outliers; {record['seconds_total']:.0f} s"
    )
    if args.evaluate:
        record = add_evaluation(record, args.model, args.output, args.evaluate, not args.quiet)
        for name, figures in record["evaluation"].items():
            print(f"{name}:\n" + results_table(figures))


def _adaptation_settings(pairs):
    from dataclasses import fields

    from training.adaptation import AdaptationSettings

    types = {field.name: field.type for field in fields(AdaptationSettings)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise argparse.ArgumentTypeError(f"unknown setting {key!r}: one of {', '.join(types)}")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value}: not a {types[key].__name__}") from None
    try:
        return AdaptationSettings(**values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_adapt(commands) -> None:
    from model_zoo import DEFAULT_MODEL_PATH

    adapt = commands.add_parser(
        "adapt",
        help="adapt a model to your cameras without labels: pseudo-labels by clustering the crops, a "
        "contrastive memory, a per-branch linear head on a contract file's maps or a checkpoint's whole network "
        "(docs/training.md)",
    )
    adapt.add_argument(
        "crops",
        help="the crops: a folder of images, the service's SQLite store (.db, sqlite:///...; read-only, "
        "the service may run) or postgresql://...",
    )
    adapt.add_argument("output", type=Path, help="the adapted .onnx file to write (its card beside it, .md)")
    adapt.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL_PATH,
        help="the fp32 contract file to start from (default: the shipped default), or a network that adapts "
        "whole: a training checkpoint (model.pt) or an OpenVINO IR (.xml; the default's ships beside it)",
    )
    adapt.add_argument("--run-dir", type=Path, default=None, help="keep each epoch's state here; rerun to resume")
    adapt.add_argument("--limit", type=_at_least_one, default=None, help="use at most this many crops, evenly spaced")
    adapt.add_argument(
        "--set",
        dest="settings",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="adaptation settings (training.adaptation.loop.AdaptationSettings), e.g. epochs=10 clusterer=mutual",
    )
    adapt.add_argument(
        "--evaluate",
        type=Path,
        action="append",
        default=[],
        help="Market-layout folder to evaluate the source and the adapted file on, side by side (repeat for several)",
    )
    adapt.add_argument("--quiet", action="store_true", help="no progress bars")
    adapt.set_defaults(run=_adapt)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "adapt":
        try:
            args.settings = _adaptation_settings(args.settings)
        except argparse.ArgumentTypeError as exc:
            build_parser().error(str(exc))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format='{"level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}',
    )
    args.run(args)
