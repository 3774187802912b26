"""docs/results.md's research-log tables, and those of the two CAMA models' cards: which rows each holds and
which result file each row reads (the kinds of table are bench.printed_tables'), so that no figure in them is
copied by hand. tests/test_results_tables.py checks that the pages show what the files hold.

    python -m bench.evaluation_tables --write-docs   # rewrite every table below on its page
"""

import argparse
from typing import Tuple

from bench.common import RESULTS_PAGE
from bench.printed_tables import (
    AdaptationRunsTable,
    AblationTable,
    AgainstSeedsTable,
    EmbedSpeedTable,
    EvaluationTable,
    FirstEnrolTable,
    FrozenHeadsTable,
    GoalsTable,
    HistoryTable,
    HostileMemoryTable,
    IvfSettingsTable,
    OneSetRunsTable,
    Row,
    RunsTable,
    ServedSettingsTable,
    SpeedColumns,
    SpeedTable,
)


BASELINE = Row("IDE+BN (baseline)", "pool/ide_bn.json")
DEFAULT_SPEED = "default (shipped)"  # the CAMA graph's key in bench.family_speed's files before --reference


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
    GoalsTable(
        "previous default goals table",
        evaluation="accuracy_fp32.json",
        rerank="pool/cama_ordered_full_rerank_onnx_evaluation.json",
        speed="embed_speed.json",
        repaired_speed="embed_speed_subnormals_zeroed.json",
        sizes="model_candidates.json",
        model="cama_mobilenetv2_pool.onnx",
    ),
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
        cpus=True,
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
        cpus=True,
    ),
    AgainstSeedsTable(
        "ablations against seeds table",
        "piece taken away",
        tuple(f"pool/cama_ordered{seed}.json" for seed in ("", "_seed1", "_seed2")),
        (
            ("the batch-hard triplet term", "pool/cama_ordered_no_triplet.json"),
            ("label smoothing", "pool/cama_ordered_no_label_smoothing.json"),
            ("fp32: the whole recipe in bf16 autocast (`cama_ordered_bf16`)", "pool/cama_ordered_bf16.json"),
        ),
    ),
    EvaluationTable(
        "ibn seeds table",
        "recipe",
        (
            three_seeds("the whole recipe, IBN-a (row `cama_ordered`)", "cama_ordered"),
            three_seeds("without IBN-a (row `cama_ordered_no_ibn`)", "cama_ordered_no_ibn"),
            three_seeds("IBN-b in place of IBN-a (row `cama_ordered_ibn_b`)", "cama_ordered_ibn_b"),
        ),
        train_accuracy=True,
        figures=2,
        cpus=True,
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
            ("baseline: fp32, IBN-a (fused layer), loader inline", "baseline"),
            ("bf16 autocast (native: AVX512-BF16)", "bf16"),
            ("bf16 autocast, channels_last", "bf16_channels_last"),
            ("IBN-a off", "no_ibn"),
            ("channels_last", "channels_last"),
            ("decode and augment in 1 worker process", "loader_worker"),
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
            SpeedColumns("family_speed.json", ("threads", "1"), "1 thread, images/s (EPYC, AVX-512)", "x reference"),
            SpeedColumns("family_speed_amx.json", ("threads", "1"), "1 thread, images/s (Xeon, AMX)", "x reference"),
        ),
        (
            ("the reference: CAMA ordered (N=3), the default of the time", ("reference", DEFAULT_SPEED)),
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
        cpus=True,
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
            cama("without label smoothing (`loss.label_smoothing=0`)", "cama_ordered_no_label_smoothing"),
            cama("the whole recipe in bf16 autocast (row `cama_ordered_bf16`; precision, below)", "cama_ordered_bf16"),
        ),
        branch_maps=1,
        cpus=True,
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
        "model (three seeds each)",
        (
            three_seeds("IDE+BN (baseline)", "ide_bn"),
            three_seeds("CLPD, global + local (the embedding)", "clpd"),
            three_seeds("CLPD, global branch alone", "clpd", "branch1"),
            three_seeds("CLPD, local (part) branch alone", "clpd", "branch2"),
        ),
        figures=2,
        train_time=True,
    ),
)


ALL_TABLES = TABLES + tuple(AblationTable(name, kind) for name in ("casn", "clpd") for kind in ("seeds", "steps"))


def pool_card_row(label: str, row: str, part: str = "all") -> Row:
    return Row(f"{label} (`{row}.json`)", f"pool/{row}.json", part)


# The card of the CAMA model that was the default until 2026-12-06 (kept for its record and its commands).
POOL_CARD_TABLES = (
    EvaluationTable(
        "card evaluation table",
        "evaluated",
        (
            Row("this file through ONNX Runtime (`accuracy_fp32.json`)", "accuracy_fp32.json"),
            Row("its branches 1-2 alone", "accuracy_fp32.json", "branches1-2"),
        ),
        branch_maps=3,
    ),
    EvaluationTable(
        "card files table",
        "file",
        (
            Row("fp32, this file (`accuracy_fp32.json`)", "accuracy_fp32.json"),
            Row("int8 (`accuracy_int8.json`)", "accuracy_int8.json"),
            Row("fp16 (`accuracy_fp16.json`)", "accuracy_fp16.json"),
            pool_card_row("fp32 with test-time flip", "cama_ordered_full_flip_onnx_evaluation"),
            pool_card_row(
                "fp32 with k-reciprocal re-ranking, every query in the graph",
                "cama_ordered_full_rerank_onnx_evaluation",
                "all_rerank",
            ),
            pool_card_row(
                "fp32 re-ranked as the service does (`rerank=true`: each query alone with its shortlist)",
                "cama_ordered_full_rerank_single_onnx_evaluation",
                "all_rerank",
            ),
        ),
    ),
    HistoryTable(
        "card training table",
        (
            ("this model", "pool/cama_ordered_full_history.json"),
            (
                "without colour jitter, grayscale and erasing",
                "pool/cama_ordered_full_no_colour_no_erasing_history.json",
            ),
        ),
    ),
    EvaluationTable(
        "card candidates table",
        "model",
        (
            Row("**this model** (the recipe on its full schedule; `accuracy_fp32.json`)", "accuracy_fp32.json"),
            pool_card_row("the same recipe on the short schedule (1 + 3 epochs of 200 batches)", "cama_ordered"),
            pool_card_row("CAMA symmetric, short schedule", "cama_symmetric"),
            pool_card_row("MltB+L_id (three branches, no penalty), short schedule", "mltb_lid"),
            pool_card_row("IDE+BN (one branch) on the same full schedule", "ide_bn_full"),
            pool_card_row(
                "the recipe without colour jitter, grayscale and random erasing on the same full schedule",
                "cama_ordered_full_no_colour_no_erasing",
            ),
            pool_card_row("IDE+BN (one branch), short schedule", "ide_bn"),
            pool_card_row("the short-schedule recipe without IBN-a", "cama_ordered_no_ibn"),
            pool_card_row("with IBN-b in place of IBN-a", "cama_ordered_ibn_b"),
            pool_card_row("without colour jitter and grayscale", "cama_ordered_no_colour"),
            pool_card_row("without random erasing", "cama_ordered_no_erasing"),
            pool_card_row("without label smoothing", "cama_ordered_no_label_smoothing"),
            pool_card_row("the short-schedule recipe in bf16 autocast", "cama_ordered_bf16"),
            pool_card_row("without the triplet term", "cama_ordered_no_triplet"),
            pool_card_row("on CUHK03-detected alone", "cama_ordered_cuhk03_only"),
            pool_card_row("the previous default, CUHK03 only", "previous_default_onnx_evaluation"),
        ),
        figures=2,
    ),
)
PREVIOUS_EVALUATION = "pool/previous_default_onnx_evaluation.json"
# The card of the CAMA model trained on CUHK03 alone, the default before that one.
CUHK03_CARD_TABLES = (
    EvaluationTable(
        "card evaluation table",
        "features",
        (
            Row("all three branches (the embedding)", PREVIOUS_EVALUATION),
            Row("branch 1 alone", PREVIOUS_EVALUATION, "branch1"),
            Row("branch 2 alone", PREVIOUS_EVALUATION, "branch2"),
            Row("branch 3 alone", PREVIOUS_EVALUATION, "branch3"),
            Row("branches 1-2", PREVIOUS_EVALUATION, "branches1-2"),
        ),
    ),
    HistoryTable("card training table", (("this model", "training/cama_continued.json"),)),
)
# docs/models.md: CAMA trained on a re-ID trunk, beside the trunk as imported.
MODELS_PAGE_TABLES = (
    EvaluationTable(
        "osnet cama table",
        "model",
        (
            Row("OSNet-x0.25 MSMT17, imported (the start)", "imported/osnet_x0_25_msmt17_evaluation.json"),
            Row("CAMA on it, `osnet_cama.yaml` (seed 0)", "imported/osnet_cama_evaluation.json"),
        ),
        branch_maps=3,
    ),
    EvaluationTable(
        "omz cama table",
        "model",
        (Row("CAMA on retail-0288, `omz_cama.yaml` (seed 0)", "imported/omz0288_cama_metrics.json"),),
        branch_maps=3,
    ),
    HistoryTable("omz cama training table", (("all branches", "imported/omz0288_cama_metrics.json"),), branches=3),
)
# docs/training.md: the quick start's run.
TRAINING_PAGE_TABLES = (
    RunsTable("quick run table", ("quick/quick_cuhk03_metrics.json",)),
    AdaptationRunsTable(
        "default network adaptation runs table",
        tuple(
            f"adaptation/adaptation_default_network{slice_}.json"
            for slice_ in ("_cuhk03", "_cuhk03_inductive", "", "_grid", "_inductive", "_centred")
        ),
    ),
)
CARDS = RESULTS_PAGE.parents[1] / "model_zoo" / "models"
PAGES = {
    RESULTS_PAGE: ALL_TABLES,
    RESULTS_PAGE.parent / "models.md": MODELS_PAGE_TABLES,
    RESULTS_PAGE.parent / "training.md": TRAINING_PAGE_TABLES,
    CARDS / "cama_mobilenetv2_pool.md": POOL_CARD_TABLES,
    CARDS / "cama_mobilenetv2_cuhk03.md": CUHK03_CARD_TABLES,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite every table in docs/results.md and cards")
    if parser.parse_args().write_docs:
        for page, tables in PAGES.items():
            text = page.read_text()
            for table in tables:
                text = table.rendered(text)
            page.write_text(text)


if __name__ == "__main__":
    main()
