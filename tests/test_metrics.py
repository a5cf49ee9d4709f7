"""Metric tests against ranks worked out by hand, ties and uneven batches included."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import metrics


def test_pessimistic_ranks_count_ties_against_the_target():
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.5],  # target 2 (0.5): 0.9 above, 0.5 tie -> rank 3
            [0.3, 0.2, 0.1, 0.0],  # target 0: best -> rank 1
            [1.0, 1.0, 1.0, 1.0],  # target 3: all tie -> rank 4
        ],
        np.float32,
    )
    ranks = metrics.pessimistic_ranks(scores, np.array([2, 0, 3]))
    assert np.asarray(ranks).tolist() == [3, 1, 4]


def test_pessimistic_ranks_of_arrays_and_tensors_agree():
    # numpy scores take a numpy path; a NaN counts as better than any score on both.
    scores = np.array([[0.2, np.nan, 0.2, 0.1], [0.5, 0.4, 0.4, np.nan]])
    targets = np.array([0, 2])  # ranks: 0.2 tied + NaN -> 3; 0.5, 0.4 tied, NaN -> 4
    from_array = metrics.pessimistic_ranks(scores, targets)
    from_tensor = metrics.pessimistic_ranks(keras.ops.convert_to_tensor(scores), targets)
    assert isinstance(from_array, np.ndarray) and from_array.dtype == np.int32
    assert from_array.tolist() == np.asarray(from_tensor).tolist() == [3, 4]


def test_metrics_over_uneven_batches_weigh_every_event_once():
    # Batch 1: ranks 1, 3 (and one padded event); batch 2: rank 30.
    # Recall@1 = 1/3, Recall@5 = 2/3, MRR@20 = (1 + 1/3 + 0) / 3,
    # NDCG@5 = (1/log2(2) + 1/log2(4)) / 3 = 1.5 / 3; LL = mean(-1, -2, -3) = -2.
    m = metrics.RankingMetrics(top_ks=(1, 5, 20))
    m.update_state(np.array([1, 3, 2]), np.array([-1.0, -2.0, -99.0]), np.array([1.0, 1.0, 0.0]))
    m.update_state(np.array([30]), np.array([-3.0]))
    r = {k: float(v) for k, v in m.result().items()}
    assert r["events"] == 3
    assert r["recall@1"] == pytest.approx(1 / 3)
    assert r["recall@5"] == pytest.approx(2 / 3)
    assert r["recall@20"] == pytest.approx(2 / 3)
    assert r["mrr@20"] == pytest.approx((1 + 1 / 3) / 3)
    assert r["ndcg@5"] == pytest.approx(1.5 / 3)
    assert r["log_likelihood"] == pytest.approx(-2.0)
    assert r["perplexity"] == pytest.approx(math.exp(2.0), rel=1e-5)
    # A mean of batch means would give recall@5 = (1 + 0) / 2 = 0.5 instead.


def test_report_schema():
    m = metrics.RankingMetrics()
    m.update_state(np.array([2, 700]), np.array([-0.5, -1.5]))
    out = metrics.report(m.result())
    assert set(out) == {"events", "recall", "mrr", "ndcg", "log_likelihood", "perplexity"}
    assert list(out["recall"]) == ["1", "5", "10", "20", "100", "500"]
    assert out["recall"]["1"] == 0 and out["recall"]["5"] == 0.5 and out["events"] == 2


def test_exclude_history_ranks_as_recommend_serves():
    scores = np.array(
        [
            [0.1, 0.4, 0.3, 0.2],  # history [1], target 2: 0.4 is gone -> rank 1 (was 2)
            [0.5, 0.2, 0.2, 0.1],  # history [0, 3], target 2: 0.5 gone, tie 0.2 -> rank 2 (was 3)
            [0.9, 0.05, 0.03, 0.02],  # history [0, 2], target 0 is in it -> last: rank 4 (was 1)
        ],
        np.float32,
    )
    histories = [np.array([1]), np.array([0, 3]), np.array([0, 2])]
    targets = np.array([2, 2, 0])
    assert np.asarray(metrics.pessimistic_ranks(scores, targets)).tolist() == [2, 3, 1]
    excluded = metrics.exclude_history(scores, histories)
    assert np.asarray(metrics.pessimistic_ranks(excluded, targets)).tolist() == [1, 2, 4]
    assert scores[0, 1] == np.float32(0.4)  # the input is not changed
