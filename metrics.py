"""Full-catalog ranking metrics shared by the model, the baselines and every report.

Every event (one history -> one true next song) counts once: the metric keeps running sums over
events and divides once at the end, so a small last batch weighs no more than any other event.
Ranks are pessimistic: a song whose score ties the target's is ranked above it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

TOP_KS = (1, 5, 10, 20, 100, 500)
KINDS = ("recall", "mrr", "ndcg")


def pessimistic_ranks(scores, targets):
    """Ranks of the targets among all catalog songs, ties counted against the target.

    Args:
      scores: float [..., num_songs], higher is better; NaN scores count as better than any.
      targets: int [...], the true next song (0-based song id).

    Returns:
      int32 [...], 1 + the number of other songs whose score is >= the target's (a numpy array
      for numpy `scores`, as the baselines give them: converting them to a tensor first took
      20x the time of the comparison itself).
    """
    if isinstance(scores, np.ndarray):
        target_scores = np.take_along_axis(scores, np.expand_dims(targets, -1), axis=-1)
        return np.sum(~(scores < target_scores), axis=-1, dtype=np.int32)
    target_scores = ops.take_along_axis(scores, ops.expand_dims(targets, -1), axis=-1)
    not_below = ops.logical_not(ops.less(scores, target_scores))
    return ops.cast(ops.sum(ops.cast(not_below, "int32"), axis=-1), "int32")


class RankingMetrics(keras.metrics.Metric):
    """Event-weighted Recall@K, MRR@K, NDCG@K and log-likelihood over a whole split.

    `result()` returns a flat dict: `recall@20`, `mrr@20`, `ndcg@20`, ..., `log_likelihood`,
    `perplexity`, `loss` (= -log_likelihood) and `events`.
    """

    def __init__(self, top_ks: tuple[int, ...] = TOP_KS, name: str = "ranking", **kwargs):
        super().__init__(name=name, **kwargs)
        self.top_ks = tuple(top_ks)
        self.sums = self.add_variable(
            shape=(len(KINDS) * len(self.top_ks) + 1,), initializer="zeros", name="sums"
        )
        self.events = self.add_variable(shape=(), initializer="zeros", name="events")

    def update_state(self, ranks, log_likelihood, sample_weight=None):
        """Adds a batch of events.

        Args:
          ranks: int [...], pessimistic 1-based ranks of the targets.
          log_likelihood: float [...], natural-log probability of each target.
          sample_weight: float [...], 1 for a real event and 0 for padding.
        """
        ranks = ops.cast(ranks, "float32")
        weight = (
            ops.ones_like(ranks) if sample_weight is None else ops.cast(sample_weight, "float32")
        )
        columns = []
        for kind in KINDS:
            for k in self.top_ks:
                inside = ops.cast(ranks <= k, "float32")
                if kind == "recall":
                    gain = inside
                elif kind == "mrr":
                    gain = inside / ranks
                else:
                    gain = inside / (ops.log(ranks + 1.0) / ops.log(2.0))
                columns.append(ops.sum(gain * weight))
        columns.append(ops.sum(ops.cast(log_likelihood, "float32") * weight))
        self.sums.assign_add(ops.stack(columns))
        self.events.assign_add(ops.sum(weight))

    def result(self) -> dict:
        means = self.sums / ops.maximum(self.events, 1.0)
        out = {}
        for i, kind in enumerate(KINDS):
            for j, k in enumerate(self.top_ks):
                out[f"{kind}@{k}"] = means[i * len(self.top_ks) + j]
        out["log_likelihood"] = means[-1]
        out["loss"] = -means[-1]
        out["perplexity"] = ops.exp(-means[-1])
        out["events"] = self.events
        return out

    def reset_state(self):
        self.sums.assign(ops.zeros_like(self.sums))
        self.events.assign(0.0)


def report(results: dict, top_ks: tuple[int, ...] = TOP_KS) -> dict:
    """Turns a flat `RankingMetrics` result into the nested `metrics.json` schema."""
    out: dict = {"events": int(round(float(results["events"])))}
    for kind in KINDS:
        out[kind] = {str(k): float(results[f"{kind}@{k}"]) for k in top_ks}
    out["log_likelihood"] = float(results["log_likelihood"])
    out["perplexity"] = float(results["perplexity"])
    return out


def exclude_history(scores: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """`scores` float [events, songs] with each event's history songs at -inf, as
    `--mode=recommend` leaves them out; a copy.

    A target that is in its own history then ties with every song at -inf or above, so its
    pessimistic rank is the whole catalog: a miss, as recommend never returns it.
    """
    out = np.array(scores)
    for row, history in enumerate(histories):
        out[row, history] = -np.inf
    return out
