"""docs/results.md's tables of evaluation figures (R1 / mAP / mINP on CUHK03-val, PRID and GRID), printed from
the result files the training runs wrote (``evaluation`` in bench/results/pool/*.json): each table names its
rows (a label, a result file, and the part of its evaluation: ``all``, the embedding, or one branch alone), so
a figure in the docs is never copied by hand. The seed tables of the papers' ablations are bench.ablation_tables',
written here too. tests/test_results_tables.py checks that the docs show what
the files hold.

    python -m bench.evaluation_tables --write-docs   # rewrite every table below in docs/results.md
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from bench.ablation_tables import ABLATIONS, RESULTS as ABLATION_RESULTS, SETS, evaluation_of, rows_table, steps_table
from bench.common import RESULTS_PAGE, generated_marker, rewrite_generated
from bench.training_table import FIGURES, percent
from training.evaluation import single_branch_keys

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_SET = SETS[0][0]


def read(file: str) -> dict:
    return json.loads((RESULTS / file).read_text())


@dataclass(frozen=True)
class Row:
    label: str
    file: str  # under bench/results
    part: str = "all"  # the evaluation's key: "all" (the embedding), "branch1", ...
    map_of: Tuple[str, ...] = ()  # instead: the mAP of each of these parts, per set
    time_note: str = ""  # after the train time: where it ran, when not the first CPU
    seeds: Tuple[str, ...] = ()  # the same run with other seeds: cells are mean ± sample SD of R1 and mAP

    def train_time(self, results: dict) -> str:
        """The run's training minutes (over every session); a branch's row, or another evaluation of the run's
        model, is the same run's."""
        if self.part != "all":
            return "(same run)"
        return " ".join(filter(None, (f"{round(results['train_seconds_total'] / 60)} min", self.time_note)))

    def cells(self, evaluation: dict, branch_maps: bool = False) -> List[str]:
        if branch_maps:  # the table's last column: each branch's mAP alone on CUHK03-val
            branches = single_branch_keys(evaluation[FIRST_SET])
            return self.cells(evaluation) + [", ".join(percent([evaluation[FIRST_SET][b]["mAP"]]) for b in branches)]
        if self.seeds:  # mean ± sample standard deviation of R1 and mAP over the seeds
            runs = [evaluation] + [evaluation_of(read(file)) for file in self.seeds]
            return [" / ".join(percent([run[s][self.part][f] for run in runs]) for f in FIGURES[:2]) for s, _ in SETS]
        if self.map_of:
            return [" / ".join(percent([evaluation[s][part]["mAP"]]) for part in self.map_of) for s, _ in SETS]
        return [" / ".join(percent([evaluation[s][self.part][f]]) for f in FIGURES) for s, _ in SETS]


class PrintedTable:
    """A table under its marker in docs/results.md; a subclass has ``name`` (the marker's) and ``table()``."""

    name: str

    def table(self) -> str:
        raise NotImplementedError

    @property
    def marker(self):
        return generated_marker(self.name)

    def rendered(self, text: str) -> str:
        return rewrite_generated(text, self.marker, self.table())


@dataclass(frozen=True)
class EvaluationTable(PrintedTable):
    name: str  # the docs marker's: <!-- NAME: python -m bench.evaluation_tables --write-docs -->
    heading: str  # the first column's
    rows: Tuple[Row, ...]
    branch_maps: bool = False  # a last column: each branch's mAP alone on CUHK03-val
    train_time: bool = False  # a last column: each row's training minutes

    def table(self) -> str:
        columns = [self.heading, *(label for _, label in SETS)]
        columns += ["per-branch mAP (CUHK03-val)"] * self.branch_maps + ["train time"] * self.train_time
        lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
        for row in self.rows:
            results = read(row.file)
            cells = row.cells(evaluation_of(results), self.branch_maps)
            cells += [row.train_time(results)] if self.train_time else []
            lines.append(f"| {row.label} | {' | '.join(cells)} |")
        return "\n".join(lines)


BASELINE = Row("IDE+BN (baseline)", "pool/ide_bn.json")


def parts(file: str, *labelled: Tuple[str, str]) -> Tuple[Row, ...]:
    """Rows of one run's file: (part of its evaluation, label) each."""
    return tuple(Row(label, f"pool/{file}.json", part) for part, label in labelled)


def seed_rows(seed: int) -> Tuple[Row, ...]:
    return parts(
        f"fmn_seed{seed}",
        ("all", f"GRN + LAN (the embedding), seed {seed}"),
        ("branch1", f"GRN alone, seed {seed}"),
        ("branch2", f"mask branch + LAN alone, seed {seed}"),
    )


def clpd_variant(description: str, row: str, global_branch: bool = False) -> Tuple[Row, ...]:
    file = f"pool/{row}.json"
    return (
        Row(f"CLPD {description} (row `{row}`), global + local", file),
        *((Row("the same, global branch alone", file, "branch1"),) if global_branch else ()),
        Row("the same, local (part) branch alone", file, "branch2"),
    )


def pmm_stages(label: str, row: str) -> Row:
    return Row(f"{label} (`{row}`; below), stages I+II+III", f"pool/{row}.json")


def cama(label: str, row: str) -> Row:
    return Row(label, f"pool/{row}.json")


def casn(label: str, row: str, time_note: str = "(the same CPU)", what: str = "") -> Row:
    """A CASN ablation's row: its label, its run, and ``what`` the paper calls it, when it names it."""
    return Row(f"{label} (row `{row}`{what and ', ' + what})", f"pool/{row}.json", time_note=time_note)


def with_pair_term(label: str, row: str) -> Row:
    """The run's model evaluated with CASN's pairwise attention term over the shortlist."""
    return Row(
        f"{label}, features + {'the' if label == 'CASN' else 'its'} pairwise attention term over the shortlist",
        f"pool/{row}_pair_attention_onnx_evaluation.json",
        "all_pair",
    )


def three_seeds(label: str, run: str, part: str = "all") -> Row:
    """Seed 0 (the run's first file) and seeds 1 and 2."""
    return Row(label, f"pool/{run}.json", part, seeds=tuple(f"pool/{run}_seed{seed}.json" for seed in (1, 2)))


TABLES = (
    EvaluationTable(
        "training data table",
        "training data",
        (
            cama("the pool (7 sources; row `cama_ordered`)", "cama_ordered"),
            cama("CUHK03-detected alone", "cama_ordered_cuhk03_only"),
            Row(
                "previous default (CUHK03 alone, the old recipe at 256x128, 6 epochs)",
                "pool/previous_default_onnx_evaluation.json",
            ),
        ),
    ),
    EvaluationTable(
        "pmm seeds table",
        "model",
        (
            three_seeds("PMM, stages I+II+III (the embedding)", "pmm"),
            three_seeds("PMM, stages I+II", "pmm", "branches1-2"),
            three_seeds("PMM, stage I alone", "pmm", "branch1"),
            three_seeds("PMM without A-Hard-Mix, stages I+II+III", "pmm_no_mix"),
            three_seeds("PMM without A-Hard-Mix, stage I alone", "pmm_no_mix", "branch1"),
        ),
    ),
    EvaluationTable(
        "casn table",
        "model",
        (
            BASELINE,
            Row("CASN, features (what the index ranks by)", "pool/casn.json", time_note="+ an earlier session's part"),
            casn(
                "CASN's IDE alone: its pair batches and recipe, the identity loss only",
                "casn_ide",
                "(a later session's CPU, with AMX)",
            ),
            casn("CASN's IDE + identification attention", "casn_ia"),
            casn("CASN's IDE + identification attention + the pair term, without the consistency", "casn_ia_pair"),
            casn(
                "CASN's IDE + the pair term and the consistency, without identification attention",
                "casn_sa",
                what="the paper's IDE + SA",
            ),
            casn(
                "the stripe layout's IDE: six 256-d stripes, the identity loss only",
                "casn_pcb_ide",
                what="the paper's PCB row",
            ),
            Row(
                "CASN on the stripe layout: identification attention, pair term, consistency (row `casn_pcb`, the "
                "paper's best model)",
                "pool/casn_pcb.json",
                time_note="(the same CPU, part in an earlier session)",
            ),
            with_pair_term("CASN", "casn"),
            with_pair_term("`casn_ia_pair`", "casn_ia_pair"),
            with_pair_term("`casn_sa`", "casn_sa"),
            Row(
                "`casn_pcb`, features + its pairwise attention term over the shortlist (the stripe layout's pair "
                "head on A, the file's `pair_maps`)",
                "pool/casn_pcb_pair_attention_onnx_evaluation.json",
                "all_pair",
            ),
        ),
        train_time=True,
    ),
    EvaluationTable(
        "fmn table",
        "model",
        (
            BASELINE,
            *parts(
                "fmn",
                ("all", "FMN: GRN + LAN (the embedding)"),
                ("branch1", "FMN: GRN alone"),
                ("branch2", "FMN: mask branch + LAN alone"),
            ),
            Row(
                "FMN with a BN neck in training (row `fmn_bn_neck`; below): GRN + LAN",
                "pool/fmn_bn_neck.json",
                time_note="(a later session's CPU, with AMX)",
            ),
            Row("the same, GRN alone", "pool/fmn_bn_neck.json", "branch1"),
            Row("the same, mask branch + LAN alone", "pool/fmn_bn_neck.json", "branch2"),
        ),
        train_time=True,
    ),
    EvaluationTable(
        "recipe ablation table",
        "recipe",
        (
            cama("the whole recipe (row `cama_ordered`)", "cama_ordered"),
            cama("without the batch-hard triplet term (`loss.triplet_weight=0`)", "cama_ordered_no_triplet"),
            cama(
                "without IBN-a (`model.ibn=false`: batch norm only in MobileNetV2's early blocks)",
                "cama_ordered_no_ibn",
            ),
            cama("IBN-b in place of IBN-a (`model.ibn=b`)", "cama_ordered_ibn_b"),
            cama(
                "without colour jitter and grayscale (`data.color_jitter=0 data.grayscale_prob=0`)",
                "cama_ordered_no_colour",
            ),
            cama("without random erasing (`data.erasing_prob=0`)", "cama_ordered_no_erasing"),
            cama(
                "without label smoothing (`loss.label_smoothing=0`; trained in bf16 autocast, below)",
                "cama_ordered_no_label_smoothing",
            ),
            cama(
                "the whole recipe in bf16 autocast (row `cama_ordered_bf16`: the baseline of the row above)",
                "cama_ordered_bf16",
            ),
        ),
        branch_maps=True,
    ),
    EvaluationTable(
        "precision table",
        "precision",
        (
            cama("fp32 (row `cama_ordered`)", "cama_ordered"),
            cama("bf16 autocast (row `cama_ordered_bf16`)", "cama_ordered_bf16"),
        ),
        branch_maps=True,
    ),
    EvaluationTable(
        "pmm table",
        "model",
        (
            BASELINE,
            *parts(
                "pmm",
                ("all", "PMM, stages I+II+III (the embedding)"),
                ("branch1", "PMM, stage I alone"),
                ("branch2", "PMM, stage II alone"),
                ("branch3", "PMM, stage III alone"),
                ("branches1-2", "PMM, stages I+II"),
            ),
            Row("PMM without A-Hard-Mix (`loss.mix=none`), stages I+II+III", "pool/pmm_no_mix.json"),
            Row(
                "PMM without A-Hard-Mix, stage I / II / III alone (mAP)",
                "pool/pmm_no_mix.json",
                map_of=("branch1", "branch2", "branch3"),
            ),
            Row(
                "PMM without the triplet term (`loss.triplet_weight=0`; below), stages I+II+III",
                "pool/pmm_no_triplet.json",
            ),
            Row(
                "PMM with its classifiers started from N(0, 0.001) (`model.classifier_init_std=0.001`; below), "
                "stages I+II+III",
                "pool/pmm_small_init.json",
            ),
            Row(
                "PMM with those classifiers behind a BN neck (`model.classifier_init_std=0.001 "
                "model.bn_neck=true`; below), stages I+II+III",
                "pool/pmm_small_init_bn_neck.json",
            ),
            pmm_stages("PMM with those classifiers and without the triplet term", "pmm_ide_head_no_triplet"),
            pmm_stages("the same without A-Hard-Mix", "pmm_ide_head_no_triplet_no_mix"),
        ),
    ),
    EvaluationTable("fmn seeds table", "FMN", seed_rows(1) + seed_rows(2)),
    EvaluationTable(
        "clpd table",
        "model",
        (
            BASELINE,
            *parts(
                "clpd",
                ("all", "CLPD, global + local (the embedding)"),
                ("branch1", "CLPD, global branch alone"),
                ("branch2", "CLPD, local (part) branch alone"),
            ),
            *clpd_variant("without the concentration losses", "clpd_base", global_branch=True),
            *clpd_variant("with the ratio loss L_r alone", "clpd_ratio_only"),
            *clpd_variant("with the distribution loss L_d alone", "clpd_distribution_only"),
            *clpd_variant(
                "with single-scale attention modules and neither loss, the paper's base", "clpd_single_scale_base"
            ),
            *clpd_variant("with average pooling of each part in place of the SPR descriptor", "clpd_gap_descriptor"),
        ),
    ),
)


@dataclass(frozen=True)
class AblationTable(PrintedTable):
    """One of bench.ablation_tables' two tables of a paper's ablation over seeds: "seeds" (each row's mean) or
    "steps" (each step paired within a seed)."""

    ablation: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.ablation} {self.kind} table"

    def table(self) -> str:
        print_table = rows_table if self.kind == "seeds" else steps_table
        return print_table(ABLATIONS[self.ablation], ABLATION_RESULTS)


ALL_TABLES = TABLES + tuple(AblationTable(name, kind) for name in ("casn", "clpd") for kind in ("seeds", "steps"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite every table in docs/results.md")
    if parser.parse_args().write_docs:
        text = RESULTS_PAGE.read_text()
        for table in ALL_TABLES:
            text = table.rendered(text)
        RESULTS_PAGE.write_text(text)


if __name__ == "__main__":
    main()
