"""docs/results.md's tables of evaluation figures (R1 / mAP / mINP on CUHK03-val, PRID and GRID), printed from
the result files the training runs wrote (``evaluation`` in bench/results/pool/*.json): each table names its
rows (a label, a result file, and the part of its evaluation: ``all``, the embedding, or one branch alone), so
a figure in the docs is never copied by hand. tests/test_results_tables.py checks that the docs show what
the files hold.

    python -m bench.evaluation_tables --write-docs   # rewrite every table below in docs/results.md
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from bench.common import generated_marker, rewrite_generated

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
SETS = ("cuhk03-detected", "prid", "grid")
SET_NAMES = ("CUHK03-val", "PRID", "GRID")
METRICS = ("rank1", "mAP", "mINP")


@dataclass(frozen=True)
class Row:
    label: str
    file: str  # under bench/results
    part: str = "all"  # the evaluation's key: "all" (the embedding), "branch1", ...


@dataclass(frozen=True)
class EvaluationTable:
    name: str  # the docs marker's: <!-- NAME: python -m bench.evaluation_tables --write-docs -->
    heading: str  # the first column's
    rows: Tuple[Row, ...]

    @property
    def marker(self):
        return generated_marker(self.name)

    def table(self) -> str:
        lines = [f"| {self.heading} | {' | '.join(SET_NAMES)} |", "|---" * (1 + len(SETS)) + "|"]
        for row in self.rows:
            evaluation = json.loads((RESULTS / row.file).read_text())["evaluation"]
            cells = [" / ".join(f"{100 * evaluation[s][row.part][m]:.1f}" for m in METRICS) for s in SETS]
            lines.append(f"| {row.label} | {' | '.join(cells)} |")
        return "\n".join(lines)

    def rendered(self, text: str) -> str:
        return rewrite_generated(text, self.marker, self.table())


def seed_rows(seed: int) -> Tuple[Row, ...]:
    file = f"pool/fmn_seed{seed}.json"
    return (
        Row(f"GRN + LAN (the embedding), seed {seed}", file),
        Row(f"GRN alone, seed {seed}", file, "branch1"),
        Row(f"mask branch + LAN alone, seed {seed}", file, "branch2"),
    )


def clpd_variant(description: str, row: str, global_branch: bool = False) -> Tuple[Row, ...]:
    file = f"pool/{row}.json"
    return (
        Row(f"CLPD {description} (row `{row}`), global + local", file),
        *((Row("the same, global branch alone", file, "branch1"),) if global_branch else ()),
        Row("the same, local (part) branch alone", file, "branch2"),
    )


TABLES = (
    EvaluationTable("fmn seeds table", "FMN", seed_rows(1) + seed_rows(2)),
    EvaluationTable(
        "clpd table",
        "model",
        (
            Row("IDE+BN (baseline)", "pool/ide_bn.json"),
            Row("CLPD, global + local (the embedding)", "pool/clpd.json"),
            Row("CLPD, global branch alone", "pool/clpd.json", "branch1"),
            Row("CLPD, local (part) branch alone", "pool/clpd.json", "branch2"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite every table in docs/results.md")
    if parser.parse_args().write_docs:
        text = DOCS.read_text()
        for table in TABLES:
            text = table.rendered(text)
        DOCS.write_text(text)


if __name__ == "__main__":
    main()
