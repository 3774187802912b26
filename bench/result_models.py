"""Which model each committed result file measured, and whether the shipped file of that name is still the one it
measured (not a test): when a shipped model changes, every figure measured on the old file is listed as stale.

A result file names its model as ``{"model": {"file": NAME, "sha256": SHA}}``, ``{"model": NAME,
"model_sha256": SHA}`` or ``{"models": {NAME: {"sha256": SHA}}}`` (or ``{NAME: SHA}``). A model is "current"
when the file of that name in model_zoo/models has that sha256, "stale" when it has another, and "not shipped"
when no such file ships (a candidate or a run's file). Files that name no model file (a training run's
metrics, or files from before results recorded their model) are counted, not listed.

    python -m bench.result_models                 # print the table
    python -m bench.result_models --write-docs    # docs/results.md's table (tests/test_results_tables.py checks it)
"""

import argparse
import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from bench.common import RESULTS_PAGE, generated_marker, rewrite_generated
from model_zoo.files import sha256_of

REPO = Path(__file__).resolve().parents[1]
RESULTS, MODELS = REPO / "bench" / "results", REPO / "model_zoo" / "models"
MARKER = generated_marker("result models table")


def named_models(result: dict) -> Iterator[Tuple[str, str]]:
    """(model file name, sha256) of every model the result file says it measured."""
    if not isinstance(result, dict):
        return
    model = result.get("model")
    if isinstance(model, dict) and "sha256" in model:
        yield Path(model.get("file") or model.get("name", "?")).name, model["sha256"]
    elif isinstance(model, str) and "model_sha256" in result:
        yield Path(model).name, result["model_sha256"]
    models = result.get("models")
    if isinstance(models, dict):
        for name, entry in models.items():
            sha256 = entry.get("sha256") if isinstance(entry, dict) else entry
            if isinstance(sha256, str) and len(sha256) == 64:
                yield Path(name).name, sha256


def status(name: str, sha256: str, shipped: Dict[str, str]) -> str:
    if name not in shipped:
        return "not shipped"
    return "current" if shipped[name] == sha256 else "stale"


def survey() -> Tuple[List[Tuple[str, str, str]], int, int]:
    """(rows of (result file, model, status), files naming no model, all files)."""
    shipped = {path.name: sha256_of(path) for pattern in ("*.onnx", "*.xml") for path in sorted(MODELS.glob(pattern))}
    rows, unnamed, files = [], 0, sorted(RESULTS.glob("**/*.json"))
    for path in files:
        measured = sorted(set(named_models(json.loads(path.read_text()))))
        unnamed += not measured
        rows.extend((path.relative_to(RESULTS).as_posix(), name, status(name, sha, shipped)) for name, sha in measured)
    return rows, unnamed, len(files)


def table() -> str:
    rows, unnamed, total = survey()
    lines = ["| result file | model | the shipped file of that name |", "|---|---|---|"]
    lines += [f"| {path} | {name} | {state} |" for path, name, state in rows]
    unnamed_note = "name no model file (a training run's metrics, or measured before files recorded it)"
    lines.append(f"| {unnamed} of {total} files | {unnamed_note} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite {RESULTS_PAGE.name}'s table")
    args = parser.parse_args()
    if args.write_docs:
        RESULTS_PAGE.write_text(rewrite_generated(RESULTS_PAGE.read_text(), MARKER, table()))
    else:
        print(table())


if __name__ == "__main__":
    main()
