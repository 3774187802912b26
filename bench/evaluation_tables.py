"""docs/results.md's research-log tables, printed from the result files the runs wrote, so that no figure in
them is copied by hand:

- evaluation tables (R1 / mAP / mINP on CUHK03-val, PRID and GRID, from ``evaluation`` in
  bench/results/pool/*.json): each names its rows (a label, a result file or a run's history and epoch, the
  part of its evaluation: ``all``, the embedding, or one branch alone; seeds as mean ± sample SD), with optional
  per-branch mAP, training accuracy and training time columns;
- whole runs as bench.training_table prints them; one-seed runs against a recipe's seeds; the training
  accuracy of bench.frozen_feature_heads' heads; speed benchmarks' variants side by side (images/s and ratio);
- the seed tables of the papers' ablations (bench.ablation_tables').

tests/test_results_tables.py checks that the docs show what the files hold.

    python -m bench.evaluation_tables --write-docs   # rewrite every table below in docs/results.md
"""

import argparse
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from bench.ablation_tables import ABLATIONS, RESULTS as ABLATION_RESULTS, SETS, evaluation_of, rows_table, steps_table
from bench.common import RESULTS_PAGE, generated_marker, rewrite_generated
from bench.training_table import FIGURES, percent, table as runs_table
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
    seeds: Tuple[str, ...] = ()  # the same run with other seeds: cells are mean ± sample SD over all of them
    epoch: int = 0  # the file is a run's history: its evaluation after this epoch
    speed: str = ""  # its architecture's key in the speed column's file
    speed_note: str = ""  # after its speed

    def runs(self) -> List[dict]:
        """The row's result files: its own, then its other seeds'; of a history, the epoch's entry."""
        if self.epoch:
            return [next(entry for entry in read(self.file) if entry["epoch"] == self.epoch)]
        return [read(file) for file in (self.file, *self.seeds)]

    def train_time(self, runs: List[dict]) -> str:
        """Each run's training minutes (over every session); a branch's row, or another evaluation of the run's
        model, is the same run's."""
        if self.part != "all":
            return "(same run)"
        minutes = ", ".join(str(round(run["train_seconds_total"] / 60)) for run in runs)
        return " ".join(filter(None, (f"{minutes} min", self.time_note)))

    def cells(self, runs: List[dict], figures: int = 3, branch_maps: int = 0, spread: bool = True) -> List[str]:
        evaluations = [evaluation_of(run) for run in runs]
        mean = percent if spread else lambda values: percent([statistics.fmean(values)])
        if branch_maps:  # a column: each branch's mAP alone on the first sets (of the embedding's rows only)
            branches = single_branch_keys(evaluations[0][FIRST_SET]) if self.part == "all" else []
            maps = "; ".join(
                ", ".join(percent([e[s][b]["mAP"] for e in evaluations]) for b in branches)
                for s, _ in SETS[:branch_maps]
            )
            return self.cells(runs, figures, spread=spread) + [maps if branches else "-"]
        if self.map_of:
            return [" / ".join(percent([evaluations[0][s][part]["mAP"]]) for part in self.map_of) for s, _ in SETS]
        return [" / ".join(mean([e[s][self.part][f] for e in evaluations]) for f in FIGURES[:figures]) for s, _ in SETS]

    def speed_cell(self, file: str) -> str:
        """The architecture's images/s as a multiple of the speed file's first row's."""
        ratio = read(file)["threads"]["1"][self.speed]["ratio_to_first_median"]
        return " ".join(filter(None, (f"{ratio:.2f}x", self.speed_note)))


def train_accuracy(runs: List[dict], part: str) -> str:
    """Each run's training accuracy over its last epoch, in %: the whole model's, or one branch's classifier's."""
    key = "acc" if part == "all" else f"acc_{part}"
    return ", ".join(f"{100 * run['history'][-1][key]:.1f}" for run in runs) + "%"


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
    branch_maps: int = 0  # a column: each branch's mAP alone on this many sets (1: CUHK03-val)
    train_accuracy: bool = False  # a column: each run's training accuracy over its last epoch
    train_time: bool = False  # a last column: each run's training minutes
    figures: int = 3  # per set: R1 / mAP / mINP, or R1 / mAP
    spread: bool = True  # seeds' rows: mean ± sample SD, or the mean alone
    speed_file: str = ""  # a last column: each row's one-thread speed from this bench.family_speed file

    def table(self) -> str:
        columns = [self.heading, *(label for _, label in SETS)]
        if self.branch_maps:
            columns.append(f"per-branch mAP ({'; '.join(label for _, label in SETS[: self.branch_maps])})")
        columns += ["training accuracy, last epoch"] * self.train_accuracy + ["train time"] * self.train_time
        columns += ["CPU speed"] * bool(self.speed_file)
        lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
        for row in self.rows:
            runs = row.runs()
            cells = row.cells(runs, self.figures, self.branch_maps, self.spread)
            cells += [train_accuracy(runs, row.part)] if self.train_accuracy else []
            cells += [row.train_time(runs)] if self.train_time else []
            cells += [row.speed_cell(self.speed_file)] if self.speed_file else []
            lines.append(f"| {row.label} | {' | '.join(cells)} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class RunsTable(PrintedTable):
    """bench.training_table's table of whole runs (every set's figures and branches, schedule, hardware)."""

    name: str
    files: Tuple[str, ...]  # under bench/results

    def table(self) -> str:
        return runs_table([RESULTS / file for file in self.files])


@dataclass(frozen=True)
class AgainstSeedsTable(PrintedTable):
    """One-seed runs against a recipe's seeds: per set, the mAP difference from the seeds' mean, in points and in
    units of the seeds' sample standard deviation."""

    name: str
    heading: str
    seeds: Tuple[str, ...]  # the recipe's result files, one per seed
    rows: Tuple[Tuple[str, str], ...]  # (label, result file)

    def table(self) -> str:
        lines = [f"| {self.heading} | {' | '.join(label for _, label in SETS)} |", "|---" * (len(SETS) + 1) + "|"]
        recipe = [evaluation_of(read(file)) for file in self.seeds]
        for label, file in self.rows:
            evaluation = evaluation_of(read(file))
            cells = []
            for name, _ in SETS:
                maps = [100 * seed[name]["all"]["mAP"] for seed in recipe]
                difference = 100 * evaluation[name]["all"]["mAP"] - statistics.fmean(maps)
                cells.append(f"{difference:+.1f} ({difference / statistics.stdev(maps):+.1f} sd)")
            lines.append(f"| {label} | {' | '.join(cells)} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class FrozenHeadsTable(PrintedTable):
    """bench.frozen_feature_heads' training accuracy of each head (its key there, its label here), in %, over
    the report that ends at each of ``at`` batches."""

    name: str
    file: str
    heads: Tuple[Tuple[str, str], ...]  # (label, head)
    at: Tuple[int, ...]

    def table(self) -> str:
        results = read(self.file)
        reports = {head: {r["batches"]: r["accuracy"] for r in results["heads"][head]} for _, head in self.heads}
        span = results["heads"][self.heads[0][1]][0]["batches"]  # batches per report: its first report's end
        columns = ["head", *(f"batches {end - span + 1}-{end}" for end in self.at)]
        lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
        for label, head in self.heads:
            lines.append(f"| {label} | {' | '.join(f'{100 * reports[head][end]:.1f}' for end in self.at)} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class SpeedColumns:
    """Two columns of a speed table: images/s and the ratio a speed benchmark wrote (medians of its rounds),
    from the dict of variants found under ``within`` in ``file``."""

    file: str
    within: Tuple[str, ...]
    images_heading: str
    ratio_heading: str

    def cells(self, variant: str) -> List[str]:
        variants = read(self.file)
        for key in self.within:
            variants = variants[key]
        if variant not in variants:
            return ["-", "-"]
        figures = variants[variant]
        ratio = next(value for key, value in figures.items() if key.startswith("ratio_") and key.endswith("_median"))
        return [f"{figures['images_per_second_median']:.1f}", f"{ratio:.2f}"]


@dataclass(frozen=True)
class SpeedTable(PrintedTable):
    """Speed benchmarks' variants side by side: each row a label and its variant's key in each column pair."""

    name: str
    heading: str
    columns: Tuple[SpeedColumns, ...]
    rows: Tuple[Tuple[str, str], ...]  # (label, the variant's key)

    def table(self) -> str:
        headings = [self.heading, *(h for c in self.columns for h in (c.images_heading, c.ratio_heading))]
        lines = [f"| {' | '.join(headings)} |", "|---" * len(headings) + "|"]
        for label, variant in self.rows:
            cells = [cell for columns in self.columns for cell in columns.cells(variant)]
            lines.append(f"| {label} | {' | '.join(cells)} |")
        return "\n".join(lines)


def ms(latency: dict) -> str:
    return " / ".join(f"{latency[q]:.1f}" for q in ("p50_ms", "p95_ms", "p99_ms"))


@dataclass(frozen=True)
class IvfSettingsTable(PrintedTable):
    """bench.gallery_scale's in-process searches of one IVF gallery (its files from before the index was chosen
    automatically): every setting, by reduction, then nprobe, then the larger shortlist first."""

    name: str
    file: str

    def table(self) -> str:
        lines = [
            "| index (in process, one query at a time) | nprobe | shortlist | recall@10 "
            "| search + re-score p50 / p95 / p99 ms | in memory |",
            "|---|---|---|---|---|---|",
        ]
        for s in sorted(read(self.file)["settings"], key=lambda s: (-s["reduce_dim"], s["nprobe"], -s["candidates"])):
            lines.append(
                f"| IVF {s['nlist']} over PCA-{s['reduce_dim']} | {s['nprobe']} | {s['candidates']} | "
                f"{s['recall_at_10']:.3f} | {ms(s['search_latency'])} | {s['vectors_in_memory_gb']:.2f} GB |"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class ServedSettingsTable(PrintedTable):
    """bench.gallery_scale's real servers on one gallery, a file each (its first nprobe and shortlist served)."""

    name: str
    files: Tuple[str, ...]

    def table(self) -> str:
        lines = [
            "| served (1M items, 100 real query images, top_k=10, no heatmaps) | recall@10 | p50 / p95 / p99 ms | "
            "with heatmaps p50 ms | peak memory | ready after |",
            "|---|---|---|---|---|---|",
        ]
        for file in self.files:
            results = read(file)
            server, setting = results["server"], results["server"]["setting"]
            label = (
                f"{results.get('precision', 'fp32')}, PCA-{setting['reduce_dim']}, nprobe {setting['nprobe'][0]}, "
                f"shortlist {setting['candidates'][0]}"
            )
            lines.append(
                f"| {label} | {server['recall_at_10_real_queries']:.3f} | {ms(server['query_heatmaps_False'])} | "
                f"{server['query_heatmaps_True']['p50_ms']:.0f} | {server['server_memory']['VmHWM_gb']:.2f} GB | "
                f"{server['start_s']:.0f} s |"
            )
        return "\n".join(lines)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def enrolment_cell(peak: dict) -> str:
    """The hostile enrolment's answer: its status, and for a refusal the error code and the upload it stopped at
    (the service's message names it by its 0-based index)."""
    if peak["status"] != 413:
        return f"{peak['status']} after {peak['seconds']:.1f} s"
    error = peak["answer"]["error"]
    upload = int(re.search(r"upload (\d+)", error["message"]).group(1))
    return f"413 `{error['code']}` at the {ordinal(upload + 1)} image, after {peak['seconds']:.1f} s"


@dataclass(frozen=True)
class HostileMemoryTable(PrintedTable):
    """bench.memory_bench's runs, a file each: the server's peak memory over a hostile enrolment, its answer,
    and a top_k=100 query with heatmaps."""

    name: str
    rows: Tuple[Tuple[str, str], ...]  # (label, result file)

    def table(self) -> str:
        lines = [
            "| | peak memory of the server | enrolment | top_k=100 query with heatmaps |",
            "|---|---|---|---|",
        ]
        for label, file in self.rows:
            results = read(file)
            peak, query = results["peak_memory"], results["heatmap_query"]
            memory = f"{peak['vmhwm_before_mb']:.0f} -> {peak['vmhwm_after_mb']:,.0f} MB"
            heatmaps = (
                f"{query['seconds']:.1f} s, {query['response_mb']:.1f} MB, {query['matches_with_heatmaps']} heatmaps"
            )
            lines.append(f"| {label} | {memory} | {enrolment_cell(peak)} | {heatmaps} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class EmbedSpeedTable(PrintedTable):
    """bench.embed_speed's models side by side (images/s, medians of the rounds; after the first model, the median
    of the per-round ratios to it and their range), with each model's evaluation where a row names its file."""

    name: str
    speed_file: str
    rows: Tuple[Tuple[str, str, str], ...]  # (label, the model's key in the speed file, its evaluation file or "")

    def table(self) -> str:
        speeds = read(self.speed_file)["threads"]
        evaluated = any(evaluation for _, _, evaluation in self.rows)
        columns = ["model", "input", *((label for _, label in SETS) if evaluated else ())]
        columns += [f"{threads} thread{'s' * (threads != '1')}, images/s" for threads in speeds]
        lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
        for label, model, evaluation in self.rows:
            row = Row(label, evaluation)
            figures = row.cells(row.runs()) if evaluation else []
            height, width = speeds["1"][model]["input"]
            cells = [
                f"{height}x{width}",
                *figures,
                *(self.speed(threads[model], threads) for threads in speeds.values()),
            ]
            lines.append(f"| {label} | {' | '.join(cells)} |")
        return "\n".join(lines)

    @staticmethod
    def speed(figures: dict, models: dict) -> str:
        first = next(iter(models.values()))
        if figures is first:
            return f"{figures['images_per_second_median']:.1f}"
        ratios = [mine / theirs for mine, theirs in zip(figures["rounds"], first["rounds"])]
        return (
            f"{figures['images_per_second_median']:.1f} (**{figures['ratio_to_first_median']:.2f}x**, "
            f"rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )


@dataclass(frozen=True)
class OneSetRunsTable(PrintedTable):
    """Runs from before evaluation per set (bench/results/training: CUHK03-detected alone, one evaluation):
    rank-1/5/10, mAP, mINP, each branch's mAP alone, train time and hardware."""

    name: str
    rows: Tuple[Tuple[str, str], ...]  # (label, result file)

    def table(self) -> str:
        lines = [
            "| model | rank-1 | rank-5 | rank-10 | mAP | mINP | per branch mAP (alone) | train time | hardware |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, file in self.rows:
            results = read(file)
            evaluation = results["evaluation"]
            figures = [percent([evaluation["all"][f]]) for f in ("rank1", "rank5", "rank10", "mAP", "mINP")]
            branches = ", ".join(percent([evaluation[b]["mAP"]]) for b in single_branch_keys(evaluation)) or "-"
            minutes = f"{round(results['train_seconds_total'] / 60)} min"
            lines.append(f"| {label} | {' | '.join(figures)} | {branches} | {minutes} | {results['hardware']} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class FirstEnrolTable(PrintedTable):
    """bench.service_bench's first enrolment files (one client count each): the raw model's thread plans from
    the first file, then each file's service figure against its faster raw plan."""

    name: str
    raw_labels: Tuple[str, str]  # the service's plan, one call on every thread
    rows: Tuple[Tuple[str, str], ...]  # (label, result file)

    def table(self) -> str:
        first = read(self.rows[0][1])
        lines = ["| measured side by side (medians of 5 rounds) | images/s |", "|---|---|"]
        for label, key in zip(self.raw_labels, ("raw_service_plan", "raw_one_call")):
            lines.append(f"| {label} | {first[f'{key}_images_per_s']:.1f} |")
        for label, file in self.rows:
            results = read(file)
            raw = max(results["raw_service_plan_images_per_s"], results["raw_one_call_images_per_s"])
            low, high = results["service_over_raw_range"]
            share = f"{100 * results['service_over_raw']:.1f}% of {raw:.1f}"
            rounds = f"rounds: {100 * low:.1f}% to {100 * high:.1f}%"
            lines.append(f"| {label} | {results['service_enrol_images_per_s']:.1f}: {share} ({rounds}) |")
        return "\n".join(lines)


BASELINE = Row("IDE+BN (baseline)", "pool/ide_bn.json")
DEFAULT_SPEED = "default (shipped)"  # the CAMA graph's key in bench.family_speed's files


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


def three_seeds(label: str, run: str, part: str = "all", **options) -> Row:
    """Seed 0 (the run's first file) and seeds 1 and 2."""
    seeds = tuple(f"pool/{run}_seed{seed}.json" for seed in (1, 2))
    return Row(label, f"pool/{run}.json", part, seeds=seeds, **options)


def family(label: str, row: str, speed: str) -> Row:
    """A one-seed row of the family table: a run and its architecture's key in the speed file."""
    return Row(label, f"pool/{row}.json", speed=speed)


def pair_term(label: str, row: str, speed: str, seeds: Tuple[int, ...] = ()) -> Row:
    """A CASN run's model evaluated with its pairwise attention term over the shortlist, which re-embeds it."""
    files = tuple(f"pool/{row}_seed{seed}_pair_attention_onnx_evaluation.json" for seed in seeds)
    return Row(
        label,
        f"pool/{row}_pair_attention_onnx_evaluation.json",
        "all_pair",
        seeds=files,
        speed=speed,
        speed_note="(plus the shortlist's re-embedding)",
    )


TABLES = (
    RunsTable(
        "short schedule table",
        tuple(f"pool/{row}.json" for row in ("cama_ordered", "cama_symmetric", "mltb_lid", "ide_bn")),
    ),
    EvaluationTable(
        "baseline seeds table",
        "model",
        (three_seeds("IDE+BN (N=1)", "ide_bn"), three_seeds("CAMA ordered (N=3)", "cama_ordered")),
        branch_maps=1,
        train_accuracy=True,
        train_time=True,
    ),
    EvaluationTable(
        "recipe seeds table",
        "recipe",
        (
            three_seeds("the whole recipe (row `cama_ordered`)", "cama_ordered"),
            three_seeds("without colour jitter and grayscale", "cama_ordered_no_colour"),
            three_seeds("without random erasing", "cama_ordered_no_erasing"),
            three_seeds(
                "without either (row `cama_ordered_no_colour_no_erasing`; next paragraphs)",
                "cama_ordered_no_colour_no_erasing",
            ),
        ),
        train_accuracy=True,
        figures=2,
    ),
    AgainstSeedsTable(
        "ablations against seeds table",
        "piece taken away",
        tuple(f"pool/cama_ordered{seed}.json" for seed in ("", "_seed1", "_seed2")),
        (
            ("the batch-hard triplet term", "pool/cama_ordered_no_triplet.json"),
            ("IBN-a", "pool/cama_ordered_no_ibn.json"),
            ("IBN-a, IBN-b in its place", "pool/cama_ordered_ibn_b.json"),
            ("colour jitter and grayscale", "pool/cama_ordered_no_colour.json"),
            ("random erasing", "pool/cama_ordered_no_erasing.json"),
            ("fp32: the whole recipe in bf16 autocast (`cama_ordered_bf16`)", "pool/cama_ordered_bf16.json"),
        ),
    ),
    EvaluationTable(
        "pmm stage one table",
        "stage I of",
        (
            Row(
                "`pmm_stage1_only` (PMM's head: Kaiming-started classifier, soft-margin triplet)",
                "pool/pmm_stage1_only.json",
                "branch1",
            ),
            Row(
                "`pmm_stage1_ide_head` (small start, BN neck, soft-margin triplet)",
                "pool/pmm_stage1_ide_head.json",
                "branch1",
            ),
            Row(
                "`pmm_stage1_ide_head_no_triplet` (small start, BN neck, identity loss alone)",
                "pool/pmm_stage1_ide_head_no_triplet.json",
                "branch1",
            ),
            three_seeds("IDE+BN (three seeds, the whole model)", "ide_bn"),
        ),
        train_accuracy=True,
        figures=2,
    ),
    EvaluationTable(
        "full schedule table",
        "CAMA ordered, the recipe",
        (
            cama(
                "short schedule, 1 + 3 epochs of 200 batches (row `cama_ordered`, the default before)", "cama_ordered"
            ),
            Row(
                "full schedule after 1 + 4 of its 1 + 14 epochs (1,160 main batches)",
                "pool/cama_ordered_full_history.json",
                epoch=5,
            ),
            Row("full schedule after 1 + 9 (2,610 main batches)", "pool/cama_ordered_full_history.json", epoch=10),
            Row("**full schedule, all 1 + 14 (4,060 main batches): the shipped default**", "accuracy_fp32.json"),
            Row(
                "the default with test-time flip (`--flip`, below)", "pool/cama_ordered_full_flip_onnx_evaluation.json"
            ),
            Row(
                "the default with k-reciprocal re-ranking, every query in the graph (`--rerank all`)",
                "pool/cama_ordered_full_rerank_onnx_evaluation.json",
                "all_rerank",
            ),
            Row(
                "the default with k-reciprocal re-ranking, each query alone (`--rerank single`, the service's "
                "`rerank=true`)",
                "pool/cama_ordered_full_rerank_single_onnx_evaluation.json",
                "all_rerank",
            ),
            cama(
                "IDE+BN (N=1), the same recipe on the full schedule, all 1 + 14 epochs (`ide_bn_full`)", "ide_bn_full"
            ),
            cama(
                "the recipe without colour jitter, grayscale and random erasing, all 1 + 14 epochs "
                '(`cama_ordered_full_no_colour_no_erasing`, "Both taken away together", above)',
                "cama_ordered_full_no_colour_no_erasing",
            ),
        ),
        branch_maps=3,
    ),
    FrozenHeadsTable(
        "frozen feature heads table",
        "pool/frozen_feature_heads.json",
        (
            ("IDE+BN (BN over the map, bias-free classifier from N(0, 0.001))", "ide_bn"),
            ("IDE+BN with a ReLU on its features (all >= 0)", "ide_bn_relu"),
            ("FMN's GRN (GAP of the ReLU6 map, biased classifier, PyTorch's start)", "fmn_grn"),
            ("PMM stage I as the authors have it (GAP, conv, BN, ReLU; Kaiming-started biased classifier)", "pmm"),
            ("the same without the ReLU", "pmm_no_relu"),
            ("classifier from N(0, 0.001)", "pmm_small_init"),
            ("classifier from N(0, 0.001), no ReLU", "pmm_small_init_no_relu"),
            ("classifier from N(0, 0.001), a BN between u and the classifier", "pmm_small_init_bn_neck"),
        ),
        at=(290, 870),
    ),
    SpeedTable(
        "training speed table",
        "variant",
        (SpeedColumns("training_speed.json", ("variants",), "images/s", "against the baseline"),),
        (
            ("baseline: fp32, IBN-a (fused layer), loader inline", "baseline: fp32, IBN-a, loader inline"),
            ("bf16 autocast, forced (emulated by oneDNN on this CPU)", "bf16 autocast"),
            ("IBN-a off", "no IBN-a"),
            ("channels_last", "channels_last"),
            ("decode and augment in 1 worker process", "loader in 1 worker process"),
        ),
    ),
    SpeedTable(
        "training speed amx table",
        "variant",
        (
            SpeedColumns("training_speed_amx.json", ("variants",), "128x64 (`pool.yaml`), images/s", "against fp32"),
            SpeedColumns("training_speed_amx_256x128.json", ("variants",), "256x128, images/s", "against fp32"),
        ),
        (
            ("baseline: fp32, IBN-a, loader inline", "baseline"),
            ("bf16 autocast (native)", "bf16"),
            ("bf16 autocast, channels_last", "bf16_channels_last"),
            ("IBN-a off", "no_ibn"),
            ("channels_last", "channels_last"),
            ("decode and augment in 1 worker process", "loader_worker"),
        ),
    ),
    SpeedTable(
        "family speed table",
        "architecture",
        (
            SpeedColumns("family_speed.json", ("threads", "1"), "1 thread, images/s (no AMX)", "against the default"),
            SpeedColumns("family_speed_amx.json", ("threads", "1"), "1 thread, images/s (AMX)", "against the default"),
        ),
        (
            ("shipped default (CAMA ordered, N=3)", "default (shipped)"),
            ("IDE+BN (N=1)", "ide_bn"),
            ("CAMA (N=3), untrained", "cama"),
            ("FMN (GRN + LAN)", "fmn"),
            ("PMM (3 stages, GMP maps)", "pmm"),
            ("CASN (IDE layout)", "casn"),
            ("CASN (stripe layout: six 256-d stripes, and A as `pair_maps`)", "casn_pcb"),
            ("CLPD (8 parts, SPR descriptor)", "clpd"),
        ),
    ),
    EvaluationTable(
        "family table",
        "model",
        (
            three_seeds("IDE+BN (baseline, N=1; mean of 3 seeds)", "ide_bn", speed="ide_bn"),
            three_seeds(
                "CAMA ordered (N=3; mean of 3 seeds; the same recipe on its full schedule is the shipped default, "
                "above)",
                "cama_ordered",
                speed=DEFAULT_SPEED,
            ),
            family("CAMA symmetric (N=3)", "cama_symmetric", DEFAULT_SPEED),
            family("MltB+L_id (N=3, no penalty)", "mltb_lid", DEFAULT_SPEED),
            three_seeds("FMN (GRN + LAN; mean of 3 seeds)", "fmn", speed="fmn"),
            family("FMN with a BN neck in training (a deviation from the paper), GRN + LAN", "fmn_bn_neck", "fmn"),
            three_seeds("PMM (3 stages, A-Hard-Mix; mean of 3 seeds)", "pmm", speed="pmm"),
            three_seeds("PMM without A-Hard-Mix (mean of 3 seeds)", "pmm_no_mix", speed="pmm"),
            family(
                "PMM with IDE+BN's kind of classifier head, without its triplet term (deviations from the paper), "
                "A-Hard-Mix",
                "pmm_ide_head_no_triplet",
                "pmm",
            ),
            family("the same without A-Hard-Mix", "pmm_ide_head_no_triplet_no_mix", "pmm"),
            three_seeds("CASN (IDE layout), features (mean of 3 seeds)", "casn", speed="casn"),
            three_seeds(
                "CASN's IDE alone (its pair batches, identity loss only; mean of 3 seeds)", "casn_ide", speed="casn"
            ),
            three_seeds("CASN's IDE + identification attention (mean of 3 seeds)", "casn_ia", speed="casn"),
            three_seeds(
                "CASN's IDE + identification attention + pair term (no consistency; mean of 3 seeds)",
                "casn_ia_pair",
                speed="casn",
            ),
            family("CASN's IDE + pair term and consistency (the paper's IDE + SA)", "casn_sa", "casn"),
            pair_term("CASN, + its pair term over the shortlist (mean of 3 seeds)", "casn", "casn", seeds=(1, 2)),
            family(
                "CASN's stripe layout alone (six stripes, its pair batches, identity loss only)",
                "casn_pcb_ide",
                "casn_pcb",
            ),
            family("CASN on the stripe layout (the paper's best model), features", "casn_pcb", "casn_pcb"),
            pair_term("CASN on the stripe layout, + its pair term over the shortlist", "casn_pcb", "casn_pcb"),
            three_seeds("CLPD (8 parts, SPR; mean of 3 seeds)", "clpd", speed="clpd"),
        ),
        figures=2,
        spread=False,
        speed_file="family_speed_amx.json",
    ),
    IvfSettingsTable("previous default million index table", "gallery_1m.json"),
    ServedSettingsTable(
        "previous default million served table",
        tuple(
            f"gallery_1m{name}.json"
            for name in ("", "_served_nprobe64", "_served_pca128_nprobe64", "_served_int8_pca128_nprobe64")
        ),
    ),
    HostileMemoryTable(
        "hostile memory table",
        (
            (
                "before (every image held at full size until the request ended; heatmaps for all 100)",
                "memory_before.json",
            ),
            ("now, default `REID_MAX_REQUEST_PIXELS` (200 MP)", "memory.json"),
            ("now, `--max-request-pixels 700000000` (all 16 decoded, one at a time)", "memory_all_decoded.json"),
        ),
    ),
    EmbedSpeedTable(
        "previous default speed table",
        "embed_speed.json",
        (
            ("previous default (`cama_mobilenetv2_cuhk03.onnx`)", "model_zoo/models/cama_mobilenetv2_cuhk03.onnx", ""),
            (
                "**the default** (`cama_mobilenetv2_pool.onnx`, full schedule)",
                "model_zoo/models/cama_mobilenetv2_pool.onnx",
                "",
            ),
        ),
    ),
    EmbedSpeedTable(
        "int8 table",
        "embed_speed_int8.json",
        (
            ("fp32 (shipped)", "model_zoo/models/cama_mobilenetv2_pool.onnx", "accuracy_fp32.json"),
            ("int8", "model_zoo/models/cama_mobilenetv2_pool.int8.onnx", "accuracy_int8.json"),
        ),
    ),
    OneSetRunsTable(
        "cuhk03 runs table",
        (
            ("IDE+BN (N=1)", "training/ide_bn.json"),
            ("MltB+L_id (N=3, alpha=0)", "training/mltb_lid.json"),
            ("CAMA (N=3, alpha=1, k=20)", "training/cama.json"),
        ),
    ),
    OneSetRunsTable(
        "cuhk03 continued table",
        (("CAMA (N=3, alpha=1, k=20), 4 + 2 epochs: the previous default", "training/cama_continued.json"),),
    ),
    FirstEnrolTable(
        "previous default enrolment table",
        (
            "raw ONNX Runtime, batch 32, 2 concurrent calls x 1 thread (the service's plan on this CPU)",
            "raw ONNX Runtime, batch 32, 1 call x 2 threads",
        ),
        (
            ("**service enrol, 32 wrk connections**", "service.json"),
            (
                "service enrol, 32 httpx clients in the benchmark's own process instead of wrk (8e368ea; its own raw "
                "figures)",
                "service_enrol_httpx.json",
            ),
        ),
    ),
    EvaluationTable(
        "input size table",
        "input",
        (
            three_seeds("128x64 (row `ide_bn`, three seeds)", "ide_bn"),
            Row("192x96 (row `ide_bn_192x96`, one seed; padding 8)", "pool/ide_bn_192x96.json"),
            Row("256x128 (row `ide_bn_256x128`, one seed)", "pool/ide_bn_256x128.json"),
        ),
        train_accuracy=True,
        figures=2,
    ),
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
        figures=2,
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
        branch_maps=1,
    ),
    EvaluationTable(
        "precision table",
        "precision",
        (
            cama("fp32 (row `cama_ordered`)", "cama_ordered"),
            cama("bf16 autocast (row `cama_ordered_bf16`)", "cama_ordered_bf16"),
        ),
        branch_maps=1,
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
