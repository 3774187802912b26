"""Markdown results table from training run folders (their metrics.json), for docs/results.md: one row per run, a
column group per evaluation set (rank-1 / mAP / mINP of the whole embedding), each branch's mAP alone per set.
Runs of one row (their folders named ROW, ROW_seed1, ...) and one recipe (``recipe_key``) make one row: each
figure is the mean over the seeds, with the sample standard deviation after a +-, and the seeds column says how
many. A row is named by its architecture and its run folder (an ablation's row name in bench/pool_runs.py).

    python -m bench.training_table $RUNS/cama_ordered $RUNS/ide_bn ...
"""

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Dict, List

from training.config import TrainConfig, from_dict
from training.evaluation import single_branch_keys
from training.objectives import OBJECTIVE_REGISTRY

FIGURES = ("rank1", "mAP", "mINP")


def row_name(cfg: dict) -> str:
    """The objective's name for a run (each objective names its own rows: training/objectives)."""
    model, loss = cfg["model"], cfg["loss"]
    return OBJECTIVE_REGISTRY.get(loss.get("objective") or model.get("architecture", "cama")).row_name(model, loss)


def run_label(cfg: dict) -> str:
    """The run folder's name without a seed suffix: what tells apart rows of one architecture (ablations)."""
    return re.sub(r"_seed\d+$", "", Path(cfg["run"]["output_dir"]).name)


def percent(values: List[float], signed: bool = False) -> str:
    """The mean in %; with more than one seed, +- the sample standard deviation. ``signed``: the values are
    differences, and the mean carries its sign (a zero none)."""
    mean = round(100 * statistics.fmean(values), 1) + 0.0  # + 0.0: no "-0.0"
    text = f"{mean:+.1f}" if signed and mean else f"{mean:.1f}"
    return text if len(values) == 1 else f"{text} ± {100 * statistics.stdev(values):.1f}"


def set_cells(runs: List[dict], name: str) -> str:
    return " / ".join(percent([r["evaluation"][name]["all"][f] for r in runs]) for f in FIGURES)


def branch_cells(runs: List[dict], name: str) -> str:
    branches = single_branch_keys(runs[0]["evaluation"][name])
    return ", ".join(percent([r["evaluation"][name][b]["mAP"] for r in runs]) for b in branches) or "-"


def recipe_key(metrics: dict) -> str:
    """What a run trained, without what differs between seeds of one recipe or between machines: the model, loss
    and data settings (keys added since the run filled with their defaults, which keep the earlier behaviour), the
    precision it ran in, and its schedule as run: the learning rate after each epoch (the config of a run trained
    in two commands, warm-up then the rest, records only the second)."""
    cfg = from_dict(TrainConfig, metrics["config"]).to_dict()
    schedule = [f"{epoch['lr']:.4g}" for epoch in metrics.get("history", [])]
    recipe = {section: cfg[section] for section in ("model", "loss", "data")}
    return json.dumps(
        {**recipe, "precision": metrics.get("precision", "float32"), "schedule": schedule}, sort_keys=True
    )


def seed_groups(metrics: List[dict]) -> List[List[dict]]:
    """Runs of one row (its run folder's name, less a seed suffix) and one recipe, in the order each first appears."""
    groups: Dict[tuple, List[dict]] = {}
    for run in metrics:
        groups.setdefault((run_label(run["config"]), recipe_key(run)), []).append(run)
    return list(groups.values())


def read_metrics(run: Path) -> dict:
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.json"
    metrics = json.loads(path.read_text())
    if "all" in metrics["evaluation"]:  # runs from before per-set evaluation: one set, their training data's test split
        name = Path(metrics["config"]["data"].get("root", "test")).name
        metrics["evaluation"] = {name: metrics["evaluation"]}
    return metrics


def schedule_cell(solver: dict) -> str:
    """Epochs per phase ("1 + 3"), with the batch caps: a phase's own after its epochs, the solver's for all."""
    phases = solver.get("phases") or [{"epochs": solver["warmup_epochs"]}, {"epochs": solver["epochs"]}]
    epochs = [
        f"{p['epochs']}" + (f" (at most {p['max_iters_per_epoch']} batches)" if p.get("max_iters_per_epoch") else "")
        for p in phases
    ]
    cap = solver.get("max_iters_per_epoch")
    return " + ".join(epochs) + (f" (at most {cap} batches each)" if cap else "")


def table(runs) -> str:
    metrics = [read_metrics(run) for run in runs]
    sets = list(metrics[0]["evaluation"])
    header = [
        "model",
        *(f"{s} R1 / mAP / mINP" for s in sets),
        f"per-branch mAP ({'; '.join(sets)})",
        "seeds",
        "epochs",
        "train time",
        "hardware",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in seed_groups(metrics):
        first = group[0]
        evaluated = [s for s in sets if all(s in r["evaluation"] for r in group)]
        cells = [
            f"{row_name(first['config'])}: {run_label(first['config'])}",
            *(set_cells(group, s) if s in evaluated else "-" for s in sets),
            "; ".join(branch_cells(group, s) for s in evaluated),
            str(len(group)),
            schedule_cell(first["config"]["solver"]),
            f"{statistics.fmean(r['train_seconds_total'] for r in group) / 60:.0f} min"
            + (" each" if len(group) > 1 else ""),
            f"{' / '.join(dict.fromkeys(r['hardware'] for r in group))}, {first.get('precision', 'float32')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run folders holding metrics.json, or copies of it (bench/results/training/*.json)",
    )
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
