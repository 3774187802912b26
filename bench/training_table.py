"""Markdown results table from training run folders (their metrics.json), for the README.

    python bench/training_table.py runs/cuhk03/ide_bn runs/cuhk03/mltb_lid runs/cuhk03/cama
"""
import argparse
import json
from pathlib import Path

FIGURES = ("rank1", "rank5", "rank10", "mAP", "mINP")


def row_name(cfg: dict) -> str:
    if cfg["model"]["num_branches"] == 1:
        return "IDE+BN (N=1)"
    if cfg["loss"]["alpha"] == 0:
        return f"MltB+L_id (N={cfg['model']['num_branches']}, alpha=0)"
    return f"CAMA (N={cfg['model']['num_branches']}, alpha={cfg['loss']['alpha']:g}, k={cfg['loss']['k']})"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def table(runs) -> str:
    lines = ["| model | rank-1 | rank-5 | rank-10 | mAP | mINP | per branch mAP (alone) | train time | hardware |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        evaluation = metrics["evaluation"]
        branches = sorted(k for k in evaluation if k.startswith("branch") and "-" not in k)
        per_branch = ", ".join(percent(evaluation[b]["mAP"]) for b in branches) or "-"
        minutes = metrics["train_seconds_total"] / 60
        cells = [row_name(metrics["config"]), *(percent(evaluation["all"][f]) for f in FIGURES), per_branch, f"{minutes:.0f} min", metrics["hardware"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.json")
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
