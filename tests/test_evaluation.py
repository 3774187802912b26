from pathlib import Path

import numpy as np
import pytest

from training.cli import build_parser
from training.data.market import ImageRecord
from training.evaluation import RERANK_KEY, Rerank, features_metrics, market_metrics, results_table


def test_market_protocol_on_a_hand_worked_case():
    # One query: pid 1, camera 1. Gallery in score order after sorting:
    #   g0 pid 1 cam 1 (same pid and camera: ignored)   0.99
    #   g1 pid 2 cam 2 (wrong)                          0.90
    #   g2 pid -1 cam 2 (junk: ignored)                 0.85
    #   g3 pid 1 cam 2 (right)                          0.80
    #   g4 pid 0 cam 2 (distractor: wrong)              0.70
    #   g5 pid 1 cam 3 (right)                          0.60
    similarity = np.array([[0.99, 0.90, 0.85, 0.80, 0.70, 0.60]])
    gallery_pids = [1, 2, -1, 1, 0, 1]
    gallery_cams = [1, 2, 2, 2, 2, 3]
    m = market_metrics(similarity, [1], [1], gallery_pids, gallery_cams)
    # valid ranking: g1 (miss), g3 (hit at 2), g4 (miss), g5 (hit at 4)
    assert m["rank1"] == 0.0
    assert m["rank5"] == 1.0
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["mINP"] == pytest.approx(2 / 4)


def test_queries_are_averaged_and_queries_without_matches_skipped():
    similarity = np.array([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    m = market_metrics(similarity, [1, 2, 7], [1, 1, 1], [1, 2, 3], [2, 2, 2])
    assert m["num_queries"] == 2
    assert m["rank1"] == 1.0 and m["mAP"] == 1.0 and m["mINP"] == 1.0


def test_rank_k_counts_a_first_hit_at_position_k():
    similarity = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    m = market_metrics(similarity, [1], [1], [2, 3, 4, 5, 1, 6], [2] * 6)
    assert (m["rank1"], m["rank5"], m["rank10"]) == (0.0, 1.0, 1.0)
    assert m["mAP"] == pytest.approx(1 / 5)


def test_no_valid_match_anywhere_is_an_error():
    with pytest.raises(ValueError):
        market_metrics(np.array([[0.5]]), [1], [1], [1], [1])


def clustered_split(num_pids=6, gallery_per_pid=3, branches=2, dim=8, seed=0):
    """Per-branch L2-normalised features around one centre per person: one query each from camera 1, the
    gallery from camera 2."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_pids, branches, dim))

    def images(per_pid: int, camera: int):
        features = np.repeat(centres, per_pid, axis=0) + 0.6 * rng.normal(size=(num_pids * per_pid, branches, dim))
        records = [
            ImageRecord(Path(f"{pid:04d}_c{camera}_{i}.jpg"), pid, camera)
            for pid in range(1, num_pids + 1)
            for i in range(per_pid)
        ]
        return features / np.linalg.norm(features, axis=2, keepdims=True), records

    return (*images(1, 1), *images(gallery_per_pid, 2))


def test_re_ranking_is_opt_in_and_adds_one_key_beside_unchanged_figures():
    query_feats, query, gallery_feats, gallery = clustered_split()
    plain = features_metrics(query_feats, gallery_feats, query, gallery)
    assert set(plain) == {"all", "branch1", "branch2"}
    for variant in ("all", "single"):
        reranked = features_metrics(query_feats, gallery_feats, query, gallery, Rerank(variant, k1=4, k2=2))
        assert set(reranked) == set(plain) | {RERANK_KEY}
        assert all(reranked[key] == plain[key] for key in plain)
        figures = reranked[RERANK_KEY]
        assert {"rank1", "rank5", "rank10", "mAP", "mINP", "num_queries"} <= set(figures)
        assert (figures["rerank_variant"], figures["k1"], figures["k2"], figures["lambda_value"]) == (
            variant,
            4,
            2,
            0.3,
        )
        assert 0 <= figures["mAP"] <= 1 and figures["num_queries"] == plain["all"]["num_queries"]


@pytest.mark.parametrize("variant", ["all", "single"])
def test_re_ranking_with_lambda_one_ranks_as_the_plain_similarity(variant):
    # lambda = 1 keeps only the original distance, which orders the gallery as the mean cosine does
    query_feats, query, gallery_feats, gallery = clustered_split(seed=1)
    results = features_metrics(query_feats, gallery_feats, query, gallery, Rerank(variant, lambda_value=1.0))
    plain, reranked = results["all"], results[RERANK_KEY]
    assert all(reranked[key] == pytest.approx(plain[key]) for key in plain)


@pytest.mark.parametrize("settings", [dict(variant="both"), dict(k1=0), dict(k2=0), dict(lambda_value=1.5)])
def test_bad_re_ranking_settings_are_refused(settings):
    with pytest.raises(ValueError):
        Rerank(**settings)


def test_results_table_shows_the_re_ranked_row_only_when_there_is_one():
    query_feats, query, gallery_feats, gallery = clustered_split()
    plain = results_table({"market": features_metrics(query_feats, gallery_feats, query, gallery)})
    assert len(plain.splitlines()) == 3 and "re-ranked" not in plain
    table = results_table(
        {"market": features_metrics(query_feats, gallery_feats, query, gallery, Rerank("single", 5, 3, 0.2))}
    )
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| market", "| market (re-ranked single, k1=5 k2=3 lambda=0.2)"]
    assert rows[1].endswith("| - |")


def test_the_evaluate_command_passes_re_ranking_through(monkeypatch, capsys):
    import training.evaluation

    seen = {}

    def fake_evaluate(checkpoint, data_roots, device, progress, rerank, pair_head=None):
        seen["rerank"] = rerank
        query_feats, query, gallery_feats, gallery = clustered_split()
        return {"set": features_metrics(query_feats, gallery_feats, query, gallery, rerank)}

    monkeypatch.setattr(training.evaluation, "evaluate_checkpoint", fake_evaluate)
    args = build_parser().parse_args(
        ["evaluate", "model.pt", "--rerank", "all", "--k1", "4", "--k2", "2", "--lambda-value", "0.5"]
    )
    args.run(args)
    assert (
        seen["rerank"] == Rerank("all", 4, 2, 0.5)
        and "set (re-ranked all, k1=4 k2=2 lambda=0.5)" in capsys.readouterr().out
    )
    args = build_parser().parse_args(["evaluate", "model.pt"])
    args.run(args)
    assert seen["rerank"] is None and "re-ranked" not in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--rerank", "maybe"], ["--k1", "0"], ["--k2", "1.5"], ["--lambda-value", "2"]])
def test_the_evaluate_command_refuses_bad_re_ranking_flags(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "model.pt", *flags])
