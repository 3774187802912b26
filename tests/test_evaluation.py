import numpy as np
import pytest

from training.evaluation import market_metrics


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
