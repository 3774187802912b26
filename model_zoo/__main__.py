"""``python -m model_zoo import SRC OUT.onnx`` and ``python -m model_zoo ensemble A.onnx B.onnx ... OUT.onnx``: thin
layers over ``model_zoo.importers.import_model`` and ``model_zoo.ensemble.ensemble``."""

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo", description="Bring public re-ID models into the service's ONNX contract."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imports = commands.add_parser(
        "import",
        help="write a public embedding model as a contract ONNX file (RAM heatmaps exact), checked against its source",
        description="Formats: OpenVINO IR (SRC.xml beside SRC.bin), plain ONNX embedding models (SRC.onnx: "
        "one image input [B, 3, H, W], one embedding output; give --mean and --scale), torchreid OSNet "
        "checkpoints (SRC.pth: every width, IBN, AIN). The file records the "
        "source's sha256, licence and address "
        "(reid.source); see model_zoo/CONTRACT.md.",
    )
    imports.add_argument(
        "source",
        type=Path,
        help="the model to import: an OpenVINO IR .xml (beside its .bin), an ONNX .onnx or a torchreid OSNet .pth",
    )
    imports.add_argument("output", type=Path, help="the .onnx file to write")
    imports.add_argument(
        "--licence", default="unknown", help="the source's licence, recorded in the file (e.g. Apache-2.0)"
    )
    imports.add_argument("--url", default="", help="where the source was published, recorded in the file")
    imports.add_argument(
        "--training-data",
        default="not stated by the source",
        help="what the source was trained on, as its publisher says (reid.training_data)",
    )
    imports.add_argument(
        "--channel-order",
        choices=("bgr", "rgb"),
        default=None,
        help="the channel order the source reads (default: BGR for OpenVINO IR, OpenVINO's "
        "convention; RGB for ONNX; torchreid reads RGB)",
    )
    for name, default, meaning, imagenet in (
        ("mean", 0.0, "subtracts from", "123.675 116.28 103.53"),
        ("scale", 1.0, "divides", "58.395 57.12 57.375"),
    ):
        imports.add_argument(
            f"--{name}",
            type=float,
            nargs=3,
            default=None,
            metavar=("C1", "C2", "C3"),
            help=f"ONNX only: what the model's preprocessing {meaning} each channel, in pixel units and the "
            f"source's channel order (e.g. ImageNet's {imagenet} for RGB); default {default:g}",
        )
    imports.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        default=None,
        help="input size where the format leaves it free (torchreid: default 256 128); an IR's is its own",
    )
    imports.add_argument(
        "--real-images", type=Path, default=None, help="a folder of images for the parity check, beside random ones"
    )
    ensembles = commands.add_parser(
        "ensemble",
        help="write contract files as one, each member's branches beside the others' (RAM heatmaps exact)",
        description="The score is the mean of the members' scores weighted by their branch counts: list a "
        "file twice to weigh it twice. Members share the input size, the maps' shape and the ONNX opset; the "
        "file records each member's sha256 and source (reid.source). Evaluate and calibrate the result: the "
        "members' figures do not hold for it.",
    )
    ensembles.add_argument("members", type=Path, nargs="+", help="two contract .onnx files or more, then the output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ensemble":
        return ensemble_command(args.members[:-1], args.members[-1])
    from model_zoo.importers import Preprocessing, Provenance, import_model
    from model_zoo.importers.openvino_ir import UnsupportedGraph
    from model_zoo.onnx_export import ExportParityError

    try:
        summary = import_model(
            args.source,
            args.output,
            Provenance(args.licence, args.url, args.training_data),
            args.channel_order,
            args.real_images,
            tuple(args.input_size) if args.input_size else None,
            Preprocessing(args.mean or (0.0,) * 3, args.scale or (1.0,) * 3) if args.mean or args.scale else None,
        )
    except (OSError, ValueError, ExportParityError, UnsupportedGraph) as exc:
        print(f"python -m model_zoo import: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({key: summary[key] for key in ("output", "bytes", "source", "source_agreement")}, indent=2))
    return 0


def ensemble_command(members, output: Path) -> int:
    from model_zoo.contract import ContractError
    from model_zoo.ensemble import EnsembleError, ensemble

    try:
        summary = ensemble(members, output)
    except (OSError, ContractError, EnsembleError) as exc:
        print(f"python -m model_zoo ensemble: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
