"""Every model candidate in one table: accuracy on the three validation sets and CPU speed side by side.

Each ONNX file (trained and exported, or imported with ``python -m model_zoo import``) is evaluated with the
single-query Market protocol on CUHK03-val (cameras trained on, people not), PRID and GRID (never trained
on), then all of them take turns in one speed run (``bench/embed_speed.measure``: ratios to the first file in
the same round, because this machine's speed drifts). The result file records the commit, the command, the
machine (CPU model, cores, load), each model's sha256 and size, each data set's fingerprint and the date.

    python -m bench.model_candidates --data $DATA --output bench/results/model_candidates.json \
        model_zoo/models/person_reidentification_retail_0277.onnx model_zoo/models/cama_mobilenetv2_pool.onnx ...
    python -m bench.model_candidates --table bench/results/model_candidates.json   # the docs' table, from the file
    python -m bench.model_candidates --write-docs bench/results/model_candidates.json   # every table in the docs

The docs never hold a hand-copied figure from it: each table sits under a marker, ``<!-- candidates table: ... -->``
(every model), ``<!-- candidates rows: NAME ... -->`` (a model card's rows) or ``<!-- candidates versus: NAME:OTHER
... -->`` (each model's mAP and speed less another's: a tier against its reference), and ``--write-docs`` rewrites
them (tests/test_results_tables.py checks that the committed docs are what the committed file prints).
"""

import argparse
import json
import re
from pathlib import Path

from bench.common import DocsTables, record_end_load
from model_zoo.provenance import data_fingerprint, provenance
from bench.embed_speed import measure
from model_zoo.contract import open_cpu_session
from model_zoo.files import sha256_of
from training.evaluation import evaluate_onnx

SETS = ("cuhk03-detected", "prid", "grid")
REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/models.md", "model_zoo/models/*.md")
# A marker line, then the table it owns (the lines that start with "|"), replaced as a whole.
GENERATED = re.compile(r"^(<!-- candidates (table|rows|versus): ?([^>]*?) -->\n)(?:\n?(?:\|.*\n)+)?", re.M)


def describe_model(path: Path) -> dict:
    session, contract = open_cpu_session(path)
    metadata = session.get_modelmeta().custom_metadata_map
    return {
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size,
        "architecture": contract.architecture,
        "backbone": contract.backbone,
        "embedding_dim": contract.embedding_dim,
        "input": [contract.input_height, contract.input_width],
        "source": json.loads(metadata["reid.source"]) if "reid.source" in metadata else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help=".onnx files; speed ratios are to the first")
    parser.add_argument("--table", type=Path, default=None, help="print the table of this result file, measure nothing")
    parser.add_argument("--only", nargs="+", default=None, help="with --table: these models' rows (file names)")
    parser.add_argument(
        "--write-docs", type=Path, default=None, help="rewrite every generated table in the docs from this result file"
    )
    parser.add_argument("--data", type=Path, help="folder holding cuhk03-detected, prid and grid")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.table:
        print(candidates_table(json.loads(args.table.read_text()), args.only))
        return
    if args.write_docs and args.write_docs.name in DOCS_TABLES:
        DOCS_TABLES.write(args.write_docs)
        return
    if args.write_docs:
        results = json.loads(args.write_docs.read_text())
        for path in doc_files():
            path.write_text(render_docs(path.read_text(), results))
        return
    if not (args.models and args.data and args.output):
        parser.error("measuring needs models, --data and --output")
    roots = [args.data / name for name in SETS]
    results = {**provenance(), "data": {root.name: data_fingerprint(root) for root in roots}, "models": {}}
    for path in args.models:
        results["models"][path.name] = {
            **describe_model(path),
            "evaluation": evaluate_onnx(path, roots, progress=False),
        }
        figures = results["models"][path.name]["evaluation"]
        print(path.name, "  ".join(f"{name} mAP {100 * figures[name]['all']['mAP']:.1f}" for name in SETS), flush=True)
    results["speed"] = {"batch_size": args.batch_size, "rounds": args.rounds, "seconds": args.seconds, "threads": {}}
    for threads in args.threads:
        speeds = measure(args.models, threads, args.rounds, args.seconds, args.batch_size)
        results["speed"]["threads"][threads] = {Path(path).name: figures for path, figures in speeds.items()}
    record_end_load(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(candidates_table(results))


def candidates_table(results: dict, only=None) -> str:
    """The markdown table the docs show, from a result file: R1 / mAP / mINP per set, images/s, ratio to the
    first model, size; ``only``: these models' rows (a model card's)."""
    threads = max(results["speed"]["threads"], key=int)
    speed = results["speed"]["threads"][threads]
    head = (
        "| model | "
        + " | ".join(f"{name} R1 / mAP / mINP" for name in SETS)
        + f" | CPU images/s ({threads} threads) | x first | MB |"
    )
    lines = [head, "|" + "---|" * (len(SETS) + 4)]
    for name, model in results["models"].items():
        if only and name not in only:
            continue
        cells = [
            " / ".join(f"{100 * model['evaluation'][s]['all'][k]:.1f}" for k in ("rank1", "mAP", "mINP")) for s in SETS
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {speed[name]['images_per_second_median']:.1f} | {speed[name]['ratio_to_first_median']:.2f}"
            f" | {model['bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def versus_table(results: dict, pairs) -> str:
    """Each ``(model, other)`` pair's row: the model's mAP on each set less the other's, in points, and its images/s
    as a multiple of the other's (from the same rounds)."""
    threads = max(results["speed"]["threads"], key=int)
    speed = results["speed"]["threads"][threads]
    lines = [
        "| model | against | " + " | ".join(f"{name} mAP" for name in SETS) + f" | CPU images/s ({threads} threads) |",
        "|" + "---|" * (len(SETS) + 3),
    ]

    def mean_ap(model: str) -> list:
        return [100 * results["models"][model]["evaluation"][s]["all"]["mAP"] for s in SETS]

    for name, other in pairs:
        gaps = " | ".join(f"{mine - theirs:+.1f}" for mine, theirs in zip(mean_ap(name), mean_ap(other)))
        ratio = speed[name]["ratio_to_first_median"] / speed[other]["ratio_to_first_median"]
        lines.append(f"| {name} | {other} | {gaps} | {ratio:.2f}x |")
    return "\n".join(lines)


def doc_files():
    return [path for pattern in DOCS for path in sorted(REPO.glob(pattern))]


def render_docs(text: str, results: dict) -> str:
    """``text`` with every generated table under its marker printed again from ``results``."""

    def table(match) -> str:
        kind, names = match.group(2), match.group(3).split()
        if kind == "versus":
            return match.group(1) + "\n" + versus_table(results, [name.split(":") for name in names]) + "\n"
        return match.group(1) + "\n" + candidates_table(results, names if kind == "rows" else None) + "\n"

    return GENERATED.sub(table, text)


# Runs of a few candidates beside the main file, each with its own table on a page: result file name -> table.
DOCS_TABLES = DocsTables.on_page(
    REPO / "docs" / "models.md",
    candidates_table,
    {
        "distilled_candidates.json": "distilled candidates table",
        "omz_cama_candidates.json": "omz cama candidates table",
        "ensemble_candidates.json": "ensemble candidates table",
    },
)


if __name__ == "__main__":
    main()
