"""The figures of the shipped models' cards, printed from what the files and the result files hold (not a
benchmark: nothing is measured here). Each card of a shipped file (``model_zoo/models/NAME.md`` beside
``NAME.onnx``) has a table under ``<!-- card figures: python -m bench.model_cards --write-docs -->``, from:

- the file itself: its size and sha256, and its same-person threshold as ``python -m training calibrate``
  stored it (``reid.verification``): the calibration set, the target and reached false-match rates, the
  true-match rate, and what the same threshold gives on the sets held out;
- the int8 file beside it, where there is one, as ``python -m training quantize`` described it
  (``reid.quantization``: its calibration and its agreement with the fp32 embeddings);
- the training runs it came from, where it was trained here (``TRAINING_RUNS``: metrics files under
  bench/results): each seed's mAP per set as the run evaluated it, its training time and machine.

Accuracy and speed beside the other candidates are bench.model_candidates' rows, under their own marker.
docs/api.md's table of the default model's thresholds (``<!-- default thresholds: ... -->``) is printed from the
default file's ``reid.verification`` too.

    python -m bench.model_cards                # print every card's table
    python -m bench.model_cards --write-docs   # rewrite them in the cards
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List

import onnx

from bench.common import generated_marker, rewrite_generated
from bench.model_candidates import SETS
from model_zoo import DEFAULT_MODEL_PATH
from model_zoo.contract import METADATA_PREFIX, VERIFICATION_KEY
from model_zoo.files import sha256_of

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "model_zoo" / "models"
RESULTS = REPO / "bench" / "results"
MARKER = generated_marker("card figures")
API = REPO / "docs" / "api.md"
DEFAULT_THRESHOLDS = generated_marker("default thresholds")
# A model trained here -> its training runs' metrics files (bench/results/...), the shipped seed first.
TRAINING_RUNS = {
    "person_reidentification_retail_0288_pool.onnx": [
        "imported/omz0288_finetuned_metrics.json",
        "imported/omz0288_finetuned_seed1_metrics.json",
    ],
}


def metadata(path: Path) -> Dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def file_row(path: Path) -> str:
    return f"| file | {path.stat().st_size / 1e6:.2f} MB, sha256 `{sha256_of(path)[:16]}` | the file |"


def rates(record: Dict) -> str:
    return (
        f"FMR {record['fmr']:.1e}, TMR {record['tmr']:.3f} "
        f"({record['genuine_pairs']:,} genuine / {record['impostor_pairs']:,} impostor pairs)"
    )


def threshold_rows(verification: Dict) -> List[str]:
    """The threshold where it was calibrated, then each held-out set's rates as a multiple of the target FMR."""
    if not verification:
        return ["| same-person threshold | none stored | `reid.verification` |"]
    target = verification["target_fmr"]
    rows = [
        f"| same-person threshold | {verification['threshold']:.3f}, calibrated on {verification['calibrated_on']} "
        f"at target FMR {target:g}: {rates(verification)} | `reid.verification` |"
    ]
    for name, held in verification.get("held_out", {}).items():
        rows.append(
            f"| the same threshold on {name} (held out) | {rates(held)}: {held['fmr'] / target:.1f}x the target FMR "
            f"| `reid.verification` |"
        )
    return rows


def thresholds_table(path: Path) -> str:
    """The thresholds ``python -m training calibrate`` swept for ``path`` (the stored one in bold), then what the
    stored one gives on each set held out."""
    verification = json.loads(metadata(path)[VERIFICATION_KEY])
    calibrated_on = verification["calibrated_on"]
    rows = [f"| target FMR | threshold | {calibrated_on} FMR | {calibrated_on} TMR |", "|---|---|---|---|"]
    for point in verification["roc"]:
        target, threshold = f"{point['target_fmr']:g}", f"{point['threshold']:.3f}"
        if point["threshold"] == verification["threshold"]:
            target, threshold = f"**{target}** (stored)", f"**{threshold}**"
        rows.append(f"| {target} | {threshold} | {point['fmr']:.1e} | {point['tmr']:.3f} |")
    for name, held in verification.get("held_out", {}).items():
        rows.append(
            f"| {name}, held out | {verification['threshold']:.3f} | {held['fmr']:.1e} "
            f"({held['fmr'] / verification['target_fmr']:.1f}x the target) | {held['tmr']:.3f} |"
        )
    return "\n".join(rows)


def rendered_api(text: str) -> str:
    """docs/api.md with the default model's thresholds printed again."""
    return rewrite_generated(text, DEFAULT_THRESHOLDS, thresholds_table(DEFAULT_MODEL_PATH))


def int8_rows(path: Path) -> List[str]:
    int8 = path.with_suffix(".int8.onnx")
    if not int8.exists():
        return []
    quantization = json.loads(metadata(int8)[METADATA_PREFIX + "quantization"])
    agreement = quantization["agreement"]
    return [
        f"| int8 file | {int8.stat().st_size / 1e6:.2f} MB; {quantization['format']}, weights "
        f"{quantization['weights']}, activations {quantization['activations']}, calibrated on "
        f"{quantization['calibration_images']} training images ({quantization['calibration_method']}); mean cosine "
        f"with the fp32 embeddings {agreement['mean_cosine']:.4f} (least {agreement['min_cosine']:.3f}) over "
        f"{agreement['images']} held-out training images | `{int8.name}`: `reid.quantization` |"
    ]


def training_rows(name: str) -> List[str]:
    rows = []
    for result in TRAINING_RUNS.get(name, []):
        metrics = json.loads((RESULTS / result).read_text())
        maps = " / ".join(f"{100 * metrics['evaluation'][s]['all']['mAP']:.1f}" for s in SETS)
        rows.append(
            f"| training, seed {metrics['config']['run']['seed']} | mAP {maps} ({' / '.join(SETS)}), "
            f"{metrics['train_seconds_total'] / 60:.0f} minutes on {metrics['hardware']} | `bench/results/{result}` |"
        )
    return rows


def card_table(path: Path) -> str:
    """The figures of the shipped file ``path``'s card."""
    verification = json.loads(metadata(path).get(VERIFICATION_KEY, "{}"))
    rows = [file_row(path), *threshold_rows(verification), *int8_rows(path), *training_rows(path.name)]
    return "\n".join(["| figure | value | from |", "|---|---|---|", *rows])


def shipped_models() -> List[Path]:
    """Every fp32 file the package ships (an int8 file's figures are its fp32 file's card's)."""
    return [path for path in sorted(MODELS.glob("*.onnx")) if not path.name.endswith(".int8.onnx")]


def rendered(path: Path) -> str:
    """The card of ``path`` with its figures printed again."""
    card = path.with_suffix(".md")
    return rewrite_generated(card.read_text(), MARKER, card_table(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the tables in the cards")
    args = parser.parse_args()
    for path in shipped_models():
        if args.write_docs:
            path.with_suffix(".md").write_text(rendered(path))
        else:
            print(f"{path.with_suffix('.md').name}\n{card_table(path)}\n")
    if args.write_docs:
        API.write_text(rendered_api(API.read_text()))
    else:
        print(f"{API.name}, the default's thresholds\n{thresholds_table(DEFAULT_MODEL_PATH)}")


if __name__ == "__main__":
    main()
