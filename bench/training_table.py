"""Markdown results table from training run folders (their metrics.json), for the README: one row per run, a
column group per evaluation set (rank-1 / mAP / mINP of the whole embedding), each branch's mAP alone per set.

    python bench/training_table.py /work/runs/cama_ordered /work/runs/ide_bn ...
"""
import argparse
import json
from pathlib import Path

from training.evaluation import single_branch_keys

FIGURES = ("rank1", "mAP", "mINP")


def row_name(cfg: dict) -> str:
    model, loss = cfg["model"], cfg["loss"]
    architecture = model.get("architecture", "cama")
    if architecture == "fmn":
        return f"FMN (GRN + LAN, mask at {model.get('mask_layer', 'stem')})"
    if architecture == "casn":
        return f"CASN ({model.get('layout', 'ide')})"
    if architecture == "clpd":
        return f"CLPD ({model.get('clpd_attention', 'multiscale')} attention, {model.get('clpd_descriptor', 'SPR')} descriptor)"
    if architecture == "pmm":
        mix = loss.get("mix", "hardmix")
        return f"PMM ({'A-Hard-Mix' if mix == 'hardmix' else mix}, K={loss.get('mix_top_blocks')})"
    if model["num_branches"] == 1:
        return "IDE+BN (N=1)"
    if loss["alpha"] == 0:
        return f"MltB+L_id (N={model['num_branches']}, alpha=0)"
    return f"CAMA {loss.get('oap_mode', 'symmetric')} (N={model['num_branches']}, alpha={loss['alpha']:g}, k={loss['k']})"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def set_cells(figures: dict) -> str:
    return " / ".join(percent(figures["all"][f]) for f in FIGURES)


def branch_cells(figures: dict) -> str:
    return ", ".join(percent(figures[b]["mAP"]) for b in single_branch_keys(figures)) or "-"


def read_metrics(run: Path) -> dict:
    path = Path(run) if Path(run).is_file() else Path(run) / "metrics.json"
    metrics = json.loads(path.read_text())
    if "all" in metrics["evaluation"]:  # runs from before per-set evaluation: one set, their training data's test split
        name = Path(metrics["config"]["data"].get("root", "test")).name
        metrics["evaluation"] = {name: metrics["evaluation"]}
    return metrics


def schedule_cell(solver: dict) -> str:
    """Epochs per phase ("1 + 3"), with the per-epoch batch cap when there is one."""
    epochs = [p["epochs"] for p in solver["phases"]] if solver.get("phases") else [solver["warmup_epochs"], solver["epochs"]]
    cap = solver.get("max_iters_per_epoch")
    return " + ".join(map(str, epochs)) + (f" (at most {cap} batches each)" if cap else "")


def table(runs) -> str:
    metrics = [read_metrics(run) for run in runs]
    sets = list(metrics[0]["evaluation"])
    header = ["model", *(f"{s} R1 / mAP / mINP" for s in sets), f"per-branch mAP ({'; '.join(sets)})", "epochs", "train time", "hardware"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in metrics:
        evaluation, solver = run["evaluation"], run["config"]["solver"]
        cells = [
            row_name(run["config"]),
            *(set_cells(evaluation[s]) if s in evaluation else "-" for s in sets),
            "; ".join(branch_cells(evaluation[s]) for s in sets if s in evaluation),
            schedule_cell(solver),
            f"{run['train_seconds_total'] / 60:.0f} min",
            f"{run['hardware']}, {run.get('precision', 'float32')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.json, or copies of it (bench/results/training/*.json)")
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
