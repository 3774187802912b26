"""docs/results.md's seed tables of the papers' own ablations (CLPD, CASN), printed from the committed result files.

Each row's seeds are its result files in ``bench/results/pool/`` (``ROW.json`` is seed 0, ``ROW_seedS.json`` seed
S, copies of the run folders' metrics.json; a pair re-ranking evaluation adds ``_pair_attention_onnx_evaluation``).
The first table is each row's mean ± sample standard deviation over the seeds it has, with the CPU each seed
trained on (training on another CPU moves a row by about a seed's deviation); the second, each step of
the ablation paired within a seed (both sides trained from the same seed) over the seeds both sides have, beside
the paper's own figure for that step. R1 / mAP on CUHK03-val, PRID and GRID, in % (as training_table.py writes them).

    python -m bench.ablation_tables clpd
    python -m bench.ablation_tables casn --results bench/results/pool
"""

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from bench.training_table import percent

RESULTS = Path(__file__).resolve().parent / "results" / "pool"
SETS = (("cuhk03-detected", "CUHK03-val"), ("prid", "PRID"), ("grid", "GRID"))
PAIR_EVALUATION = "_pair_attention_onnx_evaluation"
CPU_FAMILIES = ("Xeon", "EPYC")
VECTOR_EXTENSIONS = (("amx", "AMX"), ("avx512", "AVX-512"), ("avx2", "AVX2"))  # /proc/cpuinfo prefix, name


@dataclass(frozen=True)
class Figures:
    """One row's figures: its result files (row name and file suffix) and the key of the features evaluated."""

    row: str
    key: str = "all"
    suffix: str = ""


@dataclass(frozen=True)
class Step:
    """``plus`` - ``minus`` paired within each seed; ``paper``: the paper's figure per feature key."""

    label: str
    plus: str
    minus: str
    paper: Tuple[str, ...]
    pair_term: bool = False  # the same file's features + pair re-ranking ("all_pair") against its features alone


@dataclass(frozen=True)
class Ablation:
    features: Tuple[Tuple[str, str], ...]  # (evaluation key, label); one unlabelled key: no features column
    rows: Tuple[Tuple[str, str], ...]  # (label, row)
    steps: Tuple[Step, ...]
    paper_header: str


NOT_ALONE = ("not ablated alone",) * 2
NOT_WITHOUT_MODULES = ("not ablated without the modules",) * 2
ABLATIONS = {
    "clpd": Ablation(
        features=(("all", "global + local"), ("branch2", "part branch alone")),
        rows=(
            ("without the concentration losses (`clpd_base`)", "clpd_base"),
            ("with L_r alone (`clpd_ratio_only`)", "clpd_ratio_only"),
            ("with L_d alone (`clpd_distribution_only`)", "clpd_distribution_only"),
            ("with both: CLPD (`clpd`)", "clpd"),
            ("with both, average pooling in place of SPR (`clpd_gap_descriptor`)", "clpd_gap_descriptor"),
            (
                "single-scale modules, neither loss: the paper's base+AM+SPR (`clpd_single_scale_base`)",
                "clpd_single_scale_base",
            ),
        ),
        steps=(
            Step("+ L_r (`clpd_ratio_only` - `clpd_base`)", "clpd_ratio_only", "clpd_base", NOT_ALONE),
            Step("+ L_d (`clpd_distribution_only` - `clpd_base`)", "clpd_distribution_only", "clpd_base", NOT_ALONE),
            Step("+ both (`clpd` - `clpd_base`)", "clpd", "clpd_base", NOT_WITHOUT_MODULES),
            Step(
                "the multiscale modules alone (`clpd_base` - `clpd_single_scale_base`)",
                "clpd_base",
                "clpd_single_scale_base",
                ("not ablated without the losses",) * 2,
            ),
            Step(
                "the paper's CAM over AM, with SPR (`clpd` - `clpd_single_scale_base`)",
                "clpd",
                "clpd_single_scale_base",
                ("+0.7 / +1.6", "+1.4 / +3.3"),
            ),
            Step(
                "SPR over average pooling (`clpd` - `clpd_gap_descriptor`)",
                "clpd",
                "clpd_gap_descriptor",
                ("+1.5 / +3.1", "+2.6 / +6.2"),
            ),
        ),
        paper_header="paper (Market-1501, Table VI)",
    ),
    "casn": Ablation(
        features=(("all", ""),),
        rows=(
            ("CASN's IDE alone (`casn_ide`)", "casn_ide"),
            ("+ identification attention (`casn_ia`)", "casn_ia"),
            ("+ the pair classifier (`casn_ia_pair`)", "casn_ia_pair"),
            ("+ the consistency: CASN (`casn`)", "casn"),
        ),
        steps=(
            Step("+ identification attention (`casn_ia` - `casn_ide`)", "casn_ia", "casn_ide", ("+11.0 / +9.2",)),
            Step("+ the pair classifier (`casn_ia_pair` - `casn_ia`)", "casn_ia_pair", "casn_ia", ("no such row",)),
            Step("+ the consistency (`casn` - `casn_ia_pair`)", "casn", "casn_ia_pair", ("no such row",)),
            Step("the whole CASN over its IDE (`casn` - `casn_ide`)", "casn", "casn_ide", ("+13.6 / +11.8",)),
            Step(
                "`casn`'s pair term as the re-ranking stage (features + pair term - features)",
                "casn",
                "casn",
                ("ranks with it",),
                pair_term=True,
            ),
            Step(
                "`casn_ia_pair`'s pair term as the re-ranking stage (features + pair term - features)",
                "casn_ia_pair",
                "casn_ia_pair",
                ("ranks with it",),
                pair_term=True,
            ),
        ),
        paper_header="paper (CUHK03-detected)",
    ),
}


def seed_files(results: Path, figures: Figures) -> Dict[int, Path]:
    """The row's result file per seed."""
    pattern = re.compile(rf"{re.escape(figures.row)}(?:_seed(\d+))?{re.escape(figures.suffix)}\.json")
    matches = filter(None, (pattern.fullmatch(path.name) for path in results.iterdir()))
    return dict(sorted((int(m.group(1) or 0), results / m.group(0)) for m in matches))


def evaluation_of(results: dict) -> dict:
    """The evaluation a result file holds: a metrics.json's ``evaluation``, or an evaluate --output file whole."""
    return results.get("evaluation", results)


def read_runs(results: Path, figures: Figures) -> Dict[int, dict]:
    """The row's result files, read, per seed."""
    return {seed: json.loads(path.read_text()) for seed, path in seed_files(results, figures).items()}


def figures_of(run: dict, key: str) -> List[float]:
    """R1 and mAP per evaluation set."""
    evaluation = evaluation_of(run)
    return [evaluation[name][key][figure] for name, _ in SETS for figure in ("rank1", "mAP")]


def trained_on(results: dict) -> str:
    """The CPU a run trained on: its family, from its provenance (``machine``) or, in older files, ``hardware``,
    and its widest vector extension where the file records them (two EPYCs of one name differ in AVX-512)."""
    machine = results.get("machine")
    description = machine["cpu"] if isinstance(machine, dict) else results.get("hardware") or "unrecorded"
    family = next((family for family in CPU_FAMILIES if family in description), description.split(",")[0])
    features = machine.get("cpu_features", []) if isinstance(machine, dict) else []
    widest = next((name for prefix, name in VECTOR_EXTENSIONS if any(f.startswith(prefix) for f in features)), "")
    return f"{family} {widest}".strip()


def seeds_cell(runs: Dict[int, dict]) -> str:
    """The seeds (their result files' contents, by seed) grouped by the CPU they trained on, e.g. "0 Xeon; 1, 2
    EPYC AVX-512"."""
    groups: List[Tuple[str, List[str]]] = []
    for seed, run in runs.items():
        cpu = trained_on(run)
        if not groups or groups[-1][0] != cpu:
            groups.append((cpu, []))
        groups[-1][1].append(str(seed))
    return "; ".join(f"{', '.join(numbers)} {cpu}" for cpu, numbers in groups)


def per_seed(runs: Dict[int, dict], key: str) -> Dict[int, List[float]]:
    """R1 and mAP per evaluation set of each seed's run (``read_runs``)."""
    return {seed: figures_of(run, key) for seed, run in runs.items()}


def set_cells(by_seed: Dict[int, List[float]], signed: bool) -> List[str]:
    columns = list(zip(*by_seed.values()))
    return [" / ".join(percent(columns[at + i], signed) for i in (0, 1)) for at in range(0, len(columns), 2)]


def table_row(
    label: str,
    feature: str,
    seeds: Dict[int, List[float]],
    signed: bool,
    seeds_text: str = "",
    extra: Sequence[str] = (),
) -> str:
    seeds_text = seeds_text or ", ".join(map(str, seeds))
    cells = [label, *([feature] if feature else []), seeds_text, *set_cells(seeds, signed), *extra]
    return "| " + " | ".join(cells) + " |"


def header(first: str, ablation: Ablation, seeds: str = "seeds", extra: Sequence[str] = ()) -> List[str]:
    cells = [
        first,
        *(["features"] if ablation.features[0][1] else []),
        seeds,
        *(f"{label} R1 / mAP" for _, label in SETS),
        *extra,
    ]
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def rows_table(ablation: Ablation, results: Path) -> str:
    lines = header("row", ablation, seeds="seeds, CPU trained on")
    for label, row in ablation.rows:
        for key, feature in ablation.features:
            runs = read_runs(results, Figures(row, key))
            if runs:
                lines.append(table_row(label, feature, per_seed(runs, key), False, seeds_cell(runs)))
    return "\n".join(lines)


def step_sides(step: Step, key: str) -> Tuple[Figures, Figures]:
    if step.pair_term:
        return Figures(step.plus, "all_pair", PAIR_EVALUATION), Figures(step.minus, "all", PAIR_EVALUATION)
    return Figures(step.plus, key), Figures(step.minus, key)


def paired_differences(results: Path, plus: Figures, minus: Figures) -> Dict[int, List[float]]:
    """plus - minus per seed, over the seeds both sides have."""
    high, low = (per_seed(read_runs(results, side), side.key) for side in (plus, minus))
    return {seed: [up - down for up, down in zip(high[seed], low[seed])] for seed in sorted(high.keys() & low.keys())}


def steps_table(ablation: Ablation, results: Path) -> str:
    lines = header("step, paired within each seed", ablation, extra=[ablation.paper_header])
    for step in ablation.steps:
        for (key, feature), paper in zip(ablation.features, step.paper):
            differences = paired_differences(results, *step_sides(step, key))
            if differences:
                lines.append(table_row(step.label, feature, differences, signed=True, extra=[paper]))
    return "\n".join(lines)


def tables(name: str, results: Path = RESULTS) -> str:
    ablation = ABLATIONS[name]
    return rows_table(ablation, results) + "\n\n" + steps_table(ablation, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the rows' result files")
    args = parser.parse_args()
    print(tables(args.ablation, args.results))


if __name__ == "__main__":
    main()
