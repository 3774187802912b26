"""bench/pool_runs.py (the queue of docs/results.md's training rows), bench/training_table.py (their table),
bench/ablation_tables.py (the ablations' seed tables), and the docs' tables generated from result files."""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from training.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_row_is_a_valid_training_command(tmp_path):
    """Each row loads as a config: a typo in an override would otherwise surface hours into a queue of runs."""
    pool_runs = bench_module("pool_runs")
    for name in pool_runs.ROWS:
        command = pool_runs.command(name, tmp_path / "data", tmp_path / "runs", [])
        at = command.index("--config")
        cfg = load_config(command[at + 1], command[at + 2 :])
        assert cfg.run.output_dir == str(tmp_path / "runs" / name), name
        assert pool_runs.row_config(name, tmp_path / "data", tmp_path / "runs", []) == (
            command[at + 1],
            command[at + 2 :],
        )


def test_a_row_on_another_seed_trains_in_its_own_folder_with_that_seed(tmp_path):
    pool_runs = bench_module("pool_runs")
    cfg = load_config(*pool_runs.row_config("casn_ia", tmp_path / "data", tmp_path / "runs", [], seed=2))
    assert (cfg.run.seed, cfg.run.output_dir) == (2, str(tmp_path / "runs" / "casn_ia_seed2"))
    assert cfg.loss.casn_sa_weight == 0


def test_rows_train_in_fp32_on_any_machine_but_the_bf16_row(tmp_path):
    """run.amp's default turns bf16 on where the CPU has AMX: a row must not change precision with the machine."""
    pool_runs = bench_module("pool_runs")
    amp = {
        name: load_config(*pool_runs.row_config(name, tmp_path / "data", tmp_path / "runs", [])).run.amp
        for name in pool_runs.ROWS
    }
    assert [name for name, on in amp.items() if on] == ["cama_ordered_bf16"]


def write_run(folder: Path, seed: int, rank1: float, alpha: float = 1.0, **extra) -> Path:
    folder.mkdir(parents=True)
    figures = {"rank1": rank1, "mAP": rank1 - 0.1, "mINP": 0.2}
    metrics = {
        "config": {
            "model": {"num_branches": 2},
            "loss": {"alpha": alpha, "k": 5, "oap_mode": "ordered"},
            "solver": {"phases": [{"epochs": 1}, {"epochs": 3}]},
            "run": {"seed": seed, "output_dir": str(folder)},
        },
        "evaluation": {"prid": {"all": figures, "branch1": figures, "branch2": figures}},
        "train_seconds_total": 600.0 * (seed + 1),
        "hardware": "a CPU",
        **extra,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_seeds_of_one_recipe_make_one_row_with_mean_and_standard_deviation(tmp_path):
    table = bench_module("training_table")
    runs = [
        write_run(tmp_path / "cama", 0, 0.40),
        write_run(tmp_path / "mltb", 0, 0.30, alpha=0.0),
        write_run(tmp_path / "cama_seed1", 1, 0.44),
        write_run(tmp_path / "cama_seed2", 2, 0.42),
    ]
    lines = table.table(runs).splitlines()
    assert len(lines) == 4  # header, rule, the CAMA recipe's three seeds, MltB's one
    cama, mltb = (line.split(" | ") for line in lines[2:])
    assert cama[0] == "| CAMA ordered (N=2, alpha=1, k=5): cama" and mltb[0] == "| MltB+L_id (N=2, alpha=0): mltb"
    assert cama[1] == "42.0 ± 2.0 / 32.0 ± 2.0 / 20.0 ± 0.0"
    assert cama[2] == "32.0 ± 2.0, 32.0 ± 2.0" and cama[3] == "3"
    assert cama[5] == "20 min each"
    assert mltb[1] == "30.0 / 20.0 / 20.0" and mltb[3] == "1" and mltb[5] == "10 min"


def test_seeds_trained_on_other_machines_or_before_new_config_keys_still_make_one_row(tmp_path):
    """Seed 0 of a row may come from an earlier session: another CPU, other run settings, a config written before
    keys with behaviour-keeping defaults were added, a schedule given as two commands instead of phases."""
    table = bench_module("training_table")
    history = [{"lr": 3.5e-4}, {"lr": 9.0911e-5}]
    old = write_run(tmp_path / "cama", 0, 0.40, history=history, hardware="an old CPU")
    metrics = json.loads((old / "metrics.json").read_text())
    metrics["config"]["run"].update(amp=True, threads=None)
    metrics["config"]["solver"] = {"warmup_epochs": 1, "epochs": 1, "max_iters_per_epoch": 200}
    (old / "metrics.json").write_text(json.dumps(metrics))
    new = write_run(tmp_path / "cama_seed1", 1, 0.44, history=history)
    metrics = json.loads((new / "metrics.json").read_text())
    metrics["config"]["model"]["bn_neck"] = False
    metrics["config"]["run"].update(amp=False, threads=2)
    (new / "metrics.json").write_text(json.dumps(metrics))
    lines = table.table([old, new]).splitlines()
    assert len(lines) == 3 and lines[2].split(" | ")[3] == "2"
    assert lines[2].endswith("| an old CPU / a CPU, float32 |")


def test_runs_of_one_row_that_trained_differently_are_not_averaged(tmp_path):
    table = bench_module("training_table")
    base = write_run(tmp_path / "cama", 0, 0.40, history=[{"lr": 3.5e-4}, {"lr": 9e-5}])
    other_schedule = write_run(tmp_path / "cama_seed1", 1, 0.44, history=[{"lr": 3.5e-4}, {"lr": 3e-4}])
    bf16 = write_run(tmp_path / "cama_seed2", 2, 0.42, history=[{"lr": 3.5e-4}, {"lr": 9e-5}], precision="bfloat16")
    other_loss = write_run(tmp_path / "cama_seed3", 3, 0.42, alpha=0.5, history=[{"lr": 3.5e-4}, {"lr": 9e-5}])
    assert len(table.table([base, other_schedule, bf16, other_loss]).splitlines()) == 2 + 4


def test_the_epochs_cell_says_which_phase_is_capped():
    table = bench_module("training_table")
    phases = {"phases": [{"epochs": 1}, {"epochs": 3, "max_iters_per_epoch": 200}]}
    assert table.schedule_cell(phases) == "1 + 3 (at most 200 batches)"
    assert (
        table.schedule_cell({"warmup_epochs": 1, "epochs": 3, "max_iters_per_epoch": 200})
        == "1 + 3 (at most 200 batches each)"
    )


def test_a_run_is_finished_by_its_final_evaluation_not_by_a_warm_up_summary(tmp_path):
    pool_runs = bench_module("pool_runs")
    (tmp_path / "metrics.json").write_text(json.dumps({"history": []}))
    assert not pool_runs.finished(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"history": [], "evaluation": {}}))
    assert pool_runs.finished(tmp_path)


def test_status_says_how_far_each_row_has_got(tmp_path):
    import torch

    pool_runs = bench_module("pool_runs")
    runs = tmp_path / "runs"
    assert pool_runs.progress("ide_bn", tmp_path / "data", runs, []) == "not started (4 epochs)"
    (runs / "ide_bn").mkdir(parents=True)
    torch.save({"epoch": 1, "partial": {"iteration": 50}}, runs / "ide_bn" / "last.pt")
    assert pool_runs.progress("ide_bn", tmp_path / "data", runs, []) == "2 of 4 epochs and 50 batches"
    torch.save({"epoch": 2, "partial": None}, runs / "ide_bn" / "last.pt")
    assert pool_runs.progress("ide_bn", tmp_path / "data", runs, []) == "3 of 4 epochs"
    watched = {"evaluation": {"cuhk03-detected": {"all": {"mAP": 0.5}}, "prid": {"all": {"mAP": 0.25}}}}
    (runs / "ide_bn" / "history.json").write_text(json.dumps([{"epoch": 1, **watched}, {"epoch": 2}]))
    assert (
        pool_runs.progress("ide_bn", tmp_path / "data", runs, [])
        == "3 of 4 epochs; mAP after epoch 1: cuhk03-detected 50.0, prid 25.0"
    )
    assert pool_runs.progress("ide_bn_full", tmp_path / "data", runs, []) == "not started (15 epochs)"
    (runs / "ide_bn" / "metrics.json").write_text(json.dumps({"evaluation": {}}))
    assert pool_runs.progress("ide_bn", tmp_path / "data", runs, []) == "done"


def write_result(folder: Path, name: str, figures: dict, **where) -> None:
    """A result file whose every set has these figures (key -> (rank1, mAP) in %); ``where``: its machine or
    hardware keys."""
    sets = {
        s: {key: {"rank1": r1 / 100, "mAP": ap / 100} for key, (r1, ap) in figures.items()}
        for s in ("cuhk03-detected", "prid", "grid")
    }
    body = sets if name.endswith("_evaluation.json") else {"evaluation": sets, **where}
    (folder / name).write_text(json.dumps(body))


def test_ablation_rows_average_their_seeds_name_their_cpus_and_steps_pair_only_the_seeds_both_sides_have(tmp_path):
    ablation = bench_module("ablation_tables")
    xeon = {"hardware": "Intel(R) Xeon(R) Processor, 2 threads"}  # how files before provenance name the CPU
    epyc = {"machine": {"cpu": "AMD EPYC", "cpu_features": ["avx2", "avx512f", "avx512_vnni"], "cores": 2}}
    write_result(tmp_path, "clpd_base.json", {"all": (40.0, 30.0), "branch2": (20.0, 10.0)}, **xeon)
    write_result(tmp_path, "clpd_base_seed1.json", {"all": (42.0, 34.0), "branch2": (22.0, 12.0)}, **epyc)
    write_result(tmp_path, "clpd_base_seed2.json", {"all": (44.0, 32.0), "branch2": (24.0, 14.0)}, **epyc)
    write_result(tmp_path, "clpd_ratio_only.json", {"all": (40.0, 31.0), "branch2": (20.0, 10.0)})
    write_result(tmp_path, "clpd_ratio_only_seed2.json", {"all": (45.0, 30.0), "branch2": (24.0, 14.0)})
    rows, steps = ablation.tables("clpd", tmp_path).split("\n\n")
    assert rows.splitlines()[2] == (
        "| without the concentration losses (`clpd_base`) | global + local | 0 Xeon; 1, 2 EPYC AVX-512 | "
        "42.0 ± 2.0 / 32.0 ± 2.0 | 42.0 ± 2.0 / 32.0 ± 2.0 | 42.0 ± 2.0 / 32.0 ± 2.0 |"
    )
    assert rows.splitlines()[5].endswith(
        "| part branch alone | 0, 2 unrecorded | "
        "22.0 ± 2.8 / 12.0 ± 2.8 | 22.0 ± 2.8 / 12.0 ± 2.8 | 22.0 ± 2.8 / 12.0 ± 2.8 |"
    )
    assert len(rows.splitlines()) == 2 + 4  # rows without result files are left out
    step = steps.splitlines()[2].split(" | ")
    assert step[0] == "| + L_r (`clpd_ratio_only` - `clpd_base`)" and step[2] == "0, 2"
    assert step[3] == "+0.5 ± 0.7 / -0.5 ± 2.1"  # R1: seed 0 +0, seed 2 +1; mAP: +1, -2
    assert steps.splitlines()[3].split(" | ")[3] == "0.0 ± 0.0 / 0.0 ± 0.0"  # no sign on a zero
    assert steps.splitlines()[3].endswith("| not ablated alone |")


def test_the_pair_terms_step_compares_one_evaluation_with_and_without_re_ranking(tmp_path):
    ablation = bench_module("ablation_tables")
    write_result(tmp_path, "casn.json", {"all": (30.0, 20.0)})
    write_result(tmp_path, "casn_pair_attention_onnx_evaluation.json", {"all": (30.0, 20.0), "all_pair": (27.0, 14.0)})
    rows, steps = ablation.tables("casn", tmp_path).split("\n\n")
    assert rows.splitlines()[0] == (
        "| row | seeds, CPU trained on | CUHK03-val R1 / mAP | PRID R1 / mAP | GRID R1 / mAP |"
    )
    assert steps.splitlines()[2] == (
        "| `casn`'s pair term as the re-ranking stage (features + pair term - features) | "
        "0 | "
        "-3.0 / -6.0 | -3.0 / -6.0 | -3.0 / -6.0 | ranks with it |"
    )


def test_the_results_pages_ablation_seed_tables_are_what_the_committed_results_print():
    ablation = bench_module("ablation_tables")
    results = (BENCH.parent / "docs" / "results.md").read_text()
    for name in ablation.ABLATIONS:
        for table in ablation.tables(name).split("\n\n"):
            assert table in results, (
                f"docs/results.md's {name} table: regenerate with python -m bench.ablation_tables {name}"
            )


def test_every_candidates_table_in_the_docs_is_what_the_committed_result_file_prints():
    """README, docs/models.md and the model cards hold no hand-copied figure: each table under a candidates
    marker is bench/model_candidates.py's print of bench/results/model_candidates.json."""
    candidates = bench_module("model_candidates")
    results = json.loads((BENCH / "results" / "model_candidates.json").read_text())
    assert {"commit", "command", "date", "machine", "data", "models", "speed"} <= set(results)
    assert {"cpu", "cores", "load_average_1_5_15"} <= set(results["machine"])
    assert all(model["sha256"] and model["evaluation"] for model in results["models"].values())
    markers = 0
    for path in candidates.doc_files():
        text = path.read_text()
        assert candidates.render_docs(text, results) == text, (
            f"{path}: python -m bench.model_candidates --write-docs bench/results/model_candidates.json"
        )
        for match in candidates.GENERATED.finditer(text):
            markers += 1
            if match.group(2) == "table":
                continue
            names = {name for pair in match.group(3).split() for name in pair.split(":")}
            assert names <= set(results["models"]), f"{path}: a marker names a model the file lacks"
    assert markers >= 4  # README, docs/models.md and the two imported models' cards


@pytest.mark.parametrize(
    "name, result",
    [
        ("hostile_costs", "hostile_costs.json"),
        ("cluster_bench", "cluster.json"),
        ("imported_heads", "imported/imported_heads.json"),
        ("loop_free", "loop_free.json"),
        ("heatmap_cost", "heatmap_cost.json"),
        ("heatmap_cost", "heatmap_cost_cama.json"),
        ("heatmap_cost", "heatmap_cost_ensemble.json"),
        ("adaptation", "adaptation/adaptation.json"),
        ("adaptation", "adaptation/adaptation_network.json"),
        ("adaptation", "adaptation/adaptation_omz_cama.json"),
        ("adaptation", "adaptation/camera_statistics.json"),
        ("model_candidates", "imported/distilled_candidates.json"),
        ("model_candidates", "imported/omz_cama_candidates.json"),
        ("model_candidates", "imported/ensemble_candidates.json"),
        ("threshold_estimate", "adaptation/threshold_estimate.json"),
        ("service_bench", "service_enrol.json"),
        ("service_bench", "service_enrol_before.json"),
        ("service_bench", "service_enrol_no_stored_maps.json"),
        ("service_bench", "service_query_sleeping.json"),
        ("service_bench", "service.json"),
        ("service_bench", "service_query.json"),
        ("service_bench", "service_query_before.json"),
        ("service_bench", "service_enrol_ensemble.json"),
        ("service_bench", "service_query_ensemble.json"),
        ("gallery_scale", "gallery_real.json"),
        ("gallery_scale", "gallery_real_ensemble.json"),
        ("gallery_scale", "gallery_1m_real.json"),
        ("gallery_scale", "gallery_1m_real_one_call.json"),
        ("gallery_scale", "gallery_1m_real_served.json"),
        ("gallery_scale", "gallery_1m_real_served_sleeping.json"),
    ],
)
def test_a_generated_table_in_the_docs_is_what_the_committed_result_file_prints(name, result):
    module = bench_module(name)
    table = module.DOCS_TABLES[Path(result).name] if hasattr(module, "DOCS_TABLES") else module.DOCS_TABLE
    text = table.doc.read_text()
    assert table.marker.search(text), f"{table.doc.name} lost its marker"
    results = json.loads((BENCH / "results" / result).read_text())
    assert table.rendered(text, results) == text, f"python -m bench.{name} --write-docs bench/results/{result}"


def test_result_files_name_no_folder_of_the_machine_they_were_made_on():
    """Data and run folders appear as $DATA and $RUNS (bench.common.portable_command); only throw-away files
    (/tmp) and system tools may appear as absolute paths."""
    allowed = ("/tmp/", "/usr/", "/proc/")
    path_pattern = re.compile(r"(?<![\w.$:/])/(?:[\w.-]+/)+[\w.-]*")
    found = {}

    def strings(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    for result in sorted(BENCH.glob("results/**/*.json")):
        for text in strings(json.loads(result.read_text())):
            for path in path_pattern.findall(text):
                if not path.startswith(allowed):
                    found.setdefault(result.name, path)
    assert not found, found


def test_the_docs_say_which_result_files_measured_a_model_that_has_changed():
    """A new shipped model changes its sha256: this fails until docs/results.md lists the figures measured on the
    old file as stale (python -m bench.result_models --write-docs)."""
    result_models = bench_module("result_models")
    text = result_models.RESULTS_PAGE.read_text()
    assert result_models.MARKER.search(text), "docs/results.md lost its result models marker"
    assert result_models.rewrite_generated(text, result_models.MARKER, result_models.table()) == text


def test_every_result_file_records_its_commit_command_date_and_machine():
    """bench.common.provenance's fields, in every result file but those listed as made before it (a list that
    only shrinks: a file measured again must leave it, and a listed file must exist)."""
    listed = (BENCH / "results" / "made_before_provenance.txt").read_text().splitlines()
    before = {line for line in listed if line and not line.startswith("#")}
    files = {path.relative_to(BENCH / "results").as_posix(): path for path in BENCH.glob("results/**/*.json")}
    assert before <= set(files), sorted(before - set(files))
    lacking = {}
    for name, path in sorted(files.items()):
        result = json.loads(path.read_text())
        missing = [key for key in ("commit", "command", "date", "machine") if key not in result]
        if not missing:
            missing = [key for key in ("cpu", "cores", "load_average_1_5_15") if key not in result["machine"]]
        if bool(missing) != (name in before):
            lacking[name] = missing or "records provenance: take it off made_before_provenance.txt"
    assert not lacking, lacking


def test_every_evaluation_table_in_the_docs_is_what_its_result_files_hold():
    from bench import evaluation_tables

    for page, tables in evaluation_tables.PAGES.items():
        text = page.read_text()
        for table in tables:
            assert table.marker.search(text), f"{page.name} lost the marker of {table.name}"
            assert table.rendered(text) == text, "python -m bench.evaluation_tables --write-docs"


def test_every_shipped_models_card_shows_what_its_files_and_runs_hold():
    """Each shipped file's card prints its threshold, int8 agreement and training runs from the files themselves
    (bench/model_cards.py), so a recalibrated or retrained file cannot leave its card's figures behind."""
    cards = bench_module("model_cards")
    shipped = cards.shipped_models()
    assert {path.name for path in shipped} >= set(cards.TRAINING_RUNS)
    for path in shipped:
        text = path.with_suffix(".md").read_text()
        assert cards.MARKER.search(text), f"{path.with_suffix('.md').name} has no card figures marker"
        assert cards.rendered(path) == text, "python -m bench.model_cards --write-docs"
    api = cards.API.read_text()
    assert cards.DEFAULT_THRESHOLDS.search(api) and cards.rendered_api(api) == api, (
        "python -m bench.model_cards --write-docs"
    )


def test_training_adapt_defaults_to_the_variants_the_adaptation_benchmark_chose():
    """bench.adaptation chooses the head's default variant, and the one for crops of one camera, by a fixed rule
    on the shipped default's CUHK03-val figures; ``training adapt`` must run them, whatever model it was last
    measured on."""
    from training.adaptation import _settings_for
    from training.adaptation.loop import AdaptationSettings

    results = json.loads((BENCH / "results" / "adaptation" / "adaptation.json").read_text())
    for key, settings in (
        ("chosen", AdaptationSettings()),
        ("chosen_one_camera", _settings_for(["cam"], AdaptationSettings())),
    ):
        chosen = results[key]["settings"]
        assert {name: getattr(settings, name) for name in chosen} == chosen, key


def test_a_result_file_written_in_the_clone_does_not_make_its_commit_dirty(tmp_path, monkeypatch):
    """A benchmark run from a clone writes into its bench/results; the next one run there still names the clean
    commit, while a changed code file makes it ``-dirty``."""
    from model_zoo.provenance import described_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # not the repository tmp_path may lie in
    assert described_commit(tmp_path) == "unknown"
    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "speed.json").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    commit = git("rev-parse", "--short", "HEAD")
    (tmp_path / "bench" / "results" / "speed.json").write_text('{"images_per_s": 1}\n')
    (tmp_path / "bench" / "results" / "new.json").write_text("{}\n")
    assert described_commit(tmp_path) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert described_commit(tmp_path) == f"{commit}-dirty"


def test_every_benchmark_that_writes_a_result_file_records_where_it_came_from():
    """A bench writing through bench.common.emit (or its own json) starts its results from provenance(), so a
    file measured again leaves made_before_provenance.txt instead of joining it."""
    writers = [
        path
        for path in sorted(BENCH.glob("*.py"))
        if re.search(r"(?<!def )\bemit\(|write_text\(json\.dumps\(", path.read_text())
    ]
    lacking = [path.name for path in writers if "provenance()" not in path.read_text()]
    assert writers and not lacking, lacking
