"""docs/results.md's multi-source results table: every row's training run, resumable, then the table.

Each row is a config with the multi-source recipe and the results' short schedule in its phases
(``pool_short.yaml``, or a family config such as ``fmn_pool.yaml``; the ``*_full`` rows take the recipe's own
schedule from ``pool.yaml``) plus the overrides below, trained on the whole pool and evaluated on CUHK03-val,
PRID and GRID (never trained on). The first rows are the paper family's models with the recipe (PMM with and
without A-Hard-Mix, and with small classifier starts); then CLPD's and CASN's own ablations; then CAMA ordered
with one piece taken away (ablation). A row whose run folder has a ``metrics.json`` is done and skipped; one with a
``last.pt``
resumes from it, so a schedule longer than one session runs across sessions (or hand the runs folder to a GPU
host, with a longer schedule given as phases for every row).

    python -m bench.pool_runs --data $DATA --runs $RUNS --only cama_ordered_no_triplet
    python -m bench.pool_runs --data $DATA --runs $RUNS --only cama_ordered \
        'solver.phases=[{name: warmup, epochs: 10, trainable: [classifiers], scheduler: linear, start_lr: 3.5e-6},
        {name: main, epochs: 120, scheduler: cosine}]'
    python -m bench.pool_runs --data $DATA --runs $RUNS --only casn_ia --seeds 0 1 2
    python -m bench.pool_runs --data $DATA --runs $RUNS --table-only
    python -m bench.pool_runs --data $DATA --runs $RUNS --status --only cama_ordered_full ide_bn_full

``--seeds`` trains each row once per seed (``run.seed``; seed 0 in the row's own folder, seed s in
``ROW_seedS``), for effects too small for one seed (with 451 CUHK03 queries, under about 4 rank-1 points);
the table makes one row of a recipe's seeds, mean +- standard deviation.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import torch

from training.config import load_config
from training.engine import Trainer
from training.solver import PhaseSchedule, phases_from_config

TRAIN_SETS = ("cuhk03-detected", "peta-train", "conreid-train")
EVAL_SETS = ("cuhk03-detected", "prid", "grid")

# override lists more than one row starts from
IDE_BN = ["model.num_branches=1", "loss.alpha=0"]
NO_COLOUR = ["data.color_jitter=0", "data.grayscale_prob=0"]
NO_COLOUR_NO_ERASING = [*NO_COLOUR, "data.erasing_prob=0"]
PMM_IDE_HEAD = ["model.classifier_init_std=0.001", "model.bn_neck=true"]
PMM_STAGE1_IDE_HEAD = ["loss.mix=none", "loss.pmm_trained_stages=[1]", *PMM_IDE_HEAD]

# row: (config, overrides). Every config but pool.yaml carries the short schedule in its phases (pool_short.yaml,
# *_pool.yaml).
ROWS = {
    "ide_bn": ("pool_short.yaml", IDE_BN),
    "mltb_lid": ("pool_short.yaml", ["loss.alpha=0"]),
    "cama_symmetric": ("pool_short.yaml", ["loss.oap_mode=symmetric"]),
    "cama_ordered": ("pool_short.yaml", []),
    "fmn": ("fmn_pool.yaml", []),
    # FMN's GRN trails IDE+BN by 7.7 mAP on the same phases; the heads differ in IDE+BN's BN neck (docs/results.md, FMN)
    "fmn_bn_neck": ("fmn_pool.yaml", ["model.bn_neck=true"]),
    "pmm": ("pmm_pool.yaml", []),
    "pmm_no_mix": ("pmm_pool.yaml", ["loss.mix=none"]),
    # PMM's classifiers started near zero as CAMA's: they fit one batch where the authors' Kaiming start does
    # not (bench/classifier_uptake.py), yet trained on the pool PMM learns no better (docs/results.md)
    "pmm_small_init": ("pmm_pool.yaml", ["model.classifier_init_std=0.001"]),
    # PMM without its soft-margin triplet on the raw u, whose gradient on the trunk is 4.3x the identity loss's:
    # trained, it does not unstall PMM's classifiers, and nor does pmm_no_mix (docs/results.md, PMM)
    "pmm_no_triplet": ("pmm_pool.yaml", ["loss.triplet_weight=0"]),
    # the shared backbone trained by stage I's terms alone, unmixed: does PMM stall without stages II and III (its
    # head in training) or because of them (their gradients on the backbone)?
    "pmm_stage1_only": ("pmm_pool.yaml", ["loss.mix=none", "loss.pmm_trained_stages=[1]"]),
    # PMM's stages with IDE+BN's kind of head: classifiers started near zero behind a BN neck (on fixed features
    # that pair learned as fast as IDE+BN's head; the small start alone did not unstall PMM on the pool)
    "pmm_small_init_bn_neck": ("pmm_pool.yaml", PMM_IDE_HEAD),
    # that head still stalled (6.3%): stage I alone, unmixed, with IDE+BN's kind of classifier, with and without its
    # soft-margin triplet on the reduced u; if neither learns as IDE+BN does, the reduction (conv, BN, ReLU) is left
    "pmm_stage1_ide_head": ("pmm_pool.yaml", PMM_STAGE1_IDE_HEAD),
    "pmm_stage1_ide_head_no_triplet": ("pmm_pool.yaml", [*PMM_STAGE1_IDE_HEAD, "loss.triplet_weight=0"]),
    # without the triplet term that stage I scored 12.5 mAP more in domain: the whole PMM so, with and without A-Hard-
    # Mix
    "pmm_ide_head_no_triplet": ("pmm_pool.yaml", [*PMM_IDE_HEAD, "loss.triplet_weight=0"]),
    "pmm_ide_head_no_triplet_no_mix": ("pmm_pool.yaml", [*PMM_IDE_HEAD, "loss.triplet_weight=0", "loss.mix=none"]),
    "casn": ("casn_pool.yaml", []),
    "clpd": ("clpd_pool.yaml", []),
    # the papers' own ablations (issue 11): CLPD without its concentration losses, with one of them, with GAP in
    # place of the part descriptor; CASN as IDE alone, + identification attention, + the pair term without consistency,
    # and the pair term with the consistency without identification attention (the paper's IDE + SA)
    "clpd_base": ("clpd_pool.yaml", ["loss.clpd_ratio_weight=0", "loss.clpd_distribution_weight=0"]),
    "clpd_ratio_only": ("clpd_pool.yaml", ["loss.clpd_distribution_weight=0"]),
    "clpd_distribution_only": ("clpd_pool.yaml", ["loss.clpd_ratio_weight=0"]),
    "clpd_gap_descriptor": ("clpd_pool.yaml", ["model.clpd_descriptor=G"]),
    # the paper's own base for the concentration losses: single-scale attention modules, neither loss
    "clpd_single_scale_base": (
        "clpd_pool.yaml",
        ["model.clpd_attention=single", "loss.clpd_ratio_weight=0", "loss.clpd_distribution_weight=0"],
    ),
    "casn_ide": ("casn_pool.yaml", ["loss.casn_ia_weight=0", "loss.casn_sa_weight=0"]),
    "casn_ia": ("casn_pool.yaml", ["loss.casn_sa_weight=0"]),
    "casn_ia_pair": ("casn_pool.yaml", ["loss.casn_consistency_weight=0"]),
    "casn_sa": ("casn_pool.yaml", ["loss.casn_ia_weight=0"]),
    # CASN on the stripe layout (six 256-d stripes), the paper's best model, and that layout's own IDE (the paper's PCB
    # row)
    "casn_pcb_ide": ("casn_pool.yaml", ["model.layout=pcb", "loss.casn_ia_weight=0", "loss.casn_sa_weight=0"]),
    "casn_pcb": ("casn_pool.yaml", ["model.layout=pcb"]),
    "cama_ordered_no_triplet": ("pool_short.yaml", ["loss.triplet_weight=0"]),
    "cama_ordered_no_ibn": ("pool_short.yaml", ["model.ibn=false"]),
    "cama_ordered_no_colour": ("pool_short.yaml", NO_COLOUR),
    "cama_ordered_no_erasing": ("pool_short.yaml", ["data.erasing_prob=0"]),
    # both augmentations whose removal three seeds favoured (colour: in domain; erasing: on GRID), taken away together
    "cama_ordered_no_colour_no_erasing": ("pool_short.yaml", NO_COLOUR_NO_ERASING),
    "cama_ordered_no_label_smoothing": ("pool_short.yaml", ["loss.label_smoothing=0"]),
    # bf16 autocast, to check that bf16 does not hurt accuracy where it speeds training up: natively on a CPU with
    # AVX512-BF16 or AMX, and forced elsewhere (emulated by oneDNN: the same rounding, at 0.65x fp32's speed)
    "cama_ordered_bf16": ("pool_short.yaml", ["run.amp=true", "run.force_cpu_bf16=true"]),
    # the recipe's own schedule (pool.yaml: 1 warm-up + 14 full epochs of the pool, about 7x the short one):
    # hours on a CPU, so it runs across sessions, resuming from its run folder
    "cama_ordered_full": ("pool.yaml", []),
    "ide_bn_full": ("pool.yaml", IDE_BN),
    # the short rows' best recipe on PRID + GRID and in domain (three seeds each): neither colour jitter nor erasing
    "cama_ordered_full_no_colour_no_erasing": ("pool.yaml", NO_COLOUR_NO_ERASING),
    # a candidate for the unseen cameras: IBN-b (instance norms on the stem and after the stride-4 and -8
    # stages' residual sums) in place of IBN-a
    "cama_ordered_ibn_b": ("pool_short.yaml", ["model.ibn=b"]),
    # the input size, the recipe's 128x64 (chosen for embedding speed) against the papers' 256x128 (padding
    # scaled with it): what the small input costs in accuracy, on the baseline (no k to rescale)
    "ide_bn_256x128": ("pool_short.yaml", [*IDE_BN, "data.height=256", "data.width=128", "data.padding=10"]),
    # 256x128 gained 8.3 mAP in domain and lost 5.0 on PRID (stored at 128x64): a size between the two
    "ide_bn_192x96": ("pool_short.yaml", [*IDE_BN, "data.height=192", "data.width=96", "data.padding=8"]),
    # CUHK03 alone has 113 batches an epoch: 6 capped at 100 give the pool rows' 600 main-phase batches
    "cama_ordered_cuhk03_only": (
        "pool_short.yaml",
        [
            "data.roots=[{data}/cuhk03-detected]",
            "data.source_weights={{}}",
            "solver.phases=[{{name: warmup, epochs: 1, trainable: "
            "[classifiers], scheduler: linear, start_lr: 3.5e-6}}, "
            "{{name: main, epochs: 6, max_iters_per_epoch: 100, scheduler: "
            "cosine}}]",
        ],
    ),
}


def finished(run: Path) -> bool:
    """A run with its final evaluation (a warm-up alone writes metrics.json without one)."""
    metrics = run / "metrics.json"
    return metrics.exists() and "evaluation" in json.loads(metrics.read_text())


def run_folder(runs: Path, name: str, seed: int = 0) -> Path:
    return runs / (name if seed == 0 else f"{name}_seed{seed}")


def row_config(name: str, data: Path, runs: Path, schedule: list, seed: int = 0) -> Tuple[str, List[str]]:
    """The row's config file and its overrides (the pool, the three evaluation sets, its run folder and seed)."""
    roots = ",".join(str(data / s) for s in TRAIN_SETS)
    evals = ",".join(str(data / s) for s in EVAL_SETS)
    config, extra = ROWS[name]
    # fp32 unless the row (or the command line) asks for autocast: run.amp's default follows the machine (bf16 on
    # a CPU with AMX), and the table compares recipes, not precisions
    return config, [
        f"data.roots=[{roots}]",
        f"run.eval_roots=[{evals}]",
        f"run.output_dir={run_folder(runs, name, seed)}",
        f"run.seed={seed}",
        "run.amp=false",
        *(o.format(data=data) for o in extra),
        *schedule,
    ]


def command(name: str, data: Path, runs: Path, schedule: list, seed: int = 0) -> List[str]:
    """The training command of the row, resuming from its run folder's last checkpoint when there is one."""
    config, overrides = row_config(name, data, runs, schedule, seed)
    last = run_folder(runs, name, seed) / "last.pt"
    resume = ["--resume", str(last)] if last.exists() else []
    return [sys.executable, "-m", "training", "train", "--config", config, *resume, *overrides]


def progress(name: str, data: Path, runs: Path, schedule: list, seed: int = 0) -> str:
    """How far the row's run has got: done, epochs (and batches) of its schedule from its last.pt, or not started."""
    run = run_folder(runs, name, seed)
    if finished(run):
        return "done"
    total = PhaseSchedule(
        phases_from_config(load_config(*row_config(name, data, runs, schedule, seed)).solver)
    ).total_epochs
    if not (run / "last.pt").exists():
        return f"not started ({total} epochs)"
    state = torch.load(
        run / "last.pt", map_location="cpu", weights_only=False, mmap=True
    )  # reads the tensors only if touched
    batches = (state.get("partial") or {}).get("iteration", 0)
    return f"{state['epoch'] + 1} of {total} epochs" + (f" and {batches} batches" if batches else "") + last_watch(run)


def last_watch(run: Path) -> str:
    """The run's latest run.eval_every evaluation, mAP per set (from its history.json), or '' before one."""
    history = run / "history.json"
    evaluated = [e for e in json.loads(history.read_text()) if e.get("evaluation")] if history.exists() else []
    if not evaluated:
        return ""
    sets = ", ".join(
        f"{name} {100 * figures['all']['mAP']:.1f}" for name, figures in evaluated[-1]["evaluation"].items()
    )
    return f"; mAP after epoch {evaluated[-1]['epoch']}: {sets}"


def pool_bench_parser(description: str, scratch: Path) -> argparse.ArgumentParser:
    """The options every bench on the real pool takes: the data, a throwaway run folder, threads, the result file."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder holding the training sets")
    parser.add_argument("--scratch", type=Path, default=scratch, help="throwaway run folders")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    return parser


def row_trainer(name: str, data: Path, scratch: Path) -> Trainer:
    """The row's own config (its overrides, the pool, seed 0), quiet, its run folder in ``scratch``."""
    return Trainer(load_config(*row_config(name, data, scratch, ["run.progress=false"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder holding the training and validation sets")
    parser.add_argument("--runs", type=Path, required=True, help="run folders go here, one per row (outside git)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="rows to train, in this order"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="train each row once per seed (default: 0 alone)"
    )
    parser.add_argument("--table-only", action="store_true", help="train nothing; print the table of the finished rows")
    parser.add_argument(
        "--status", action="store_true", help="train nothing; say how far each row has got, and its latest watching mAP"
    )
    parser.add_argument(
        "schedule", nargs="*", metavar="section.key=value", help="overrides for every row (the same schedule)"
    )
    args = parser.parse_args()
    if args.status:
        for name, seed in [(n, s) for n in args.only for s in args.seeds]:
            print(
                f"{run_folder(args.runs, name, seed).name}: "
                f"{progress(name, args.data.resolve(), args.runs, args.schedule, seed)}"
            )
        return
    for name, seed in [] if args.table_only else [(n, s) for n in args.only for s in args.seeds]:
        run = run_folder(args.runs, name, seed)
        if finished(run):
            print(f"{run.name}: done, skipped")
            continue
        train = command(name, args.data.resolve(), args.runs, args.schedule, seed)
        print(" ".join(train), flush=True)
        subprocess.run(train, check=True)
    done = [
        run for name in ROWS for run in [args.runs / name, *sorted(args.runs.glob(f"{name}_seed*"))] if finished(run)
    ]
    if done:
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("training_table.py")), *map(str, done)], check=True
        )


if __name__ == "__main__":
    main()
