"""The audio task's data schedule: monthly train/test splits, feature scaling, windows of plays
and the GRU report's dynamic training sets (all as play indices into `audio_reader.AudioData`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from absl import logging

from audio_reader import AudioData
from errors import DataError


@dataclasses.dataclass(frozen=True)
class MonthSplit:
    """One month's plays: the first `train_fraction` (by time) train, the rest test.

    Attributes:
      month: 'YYYY-MM'.
      train: int64 [n_train], play indices in time order.
      test: int64 [n_test], play indices in time order.
    """

    month: str
    train: np.ndarray
    test: np.ndarray


def split_months(months: np.ndarray, train_fraction: float = 0.8) -> list[MonthSplit]:
    """Splits time-ordered plays by calendar month, then each month by time.

    Args:
      months: str [plays], 'YYYY-MM' of each play, non-decreasing.
      train_fraction: share of each month's plays (rounded down) that is train.

    Returns:
      One `MonthSplit` per month present, in time order.
    """
    months = np.asarray(months)
    if np.any(months[1:] < months[:-1]):
        raise ValueError("months must be in time order")
    labels, starts = np.unique(months, return_index=True)
    ends = np.append(starts[1:], len(months))
    out = []
    for label, lo, hi in zip(labels, starts, ends, strict=True):
        cut = lo + math.floor((hi - lo) * train_fraction + 1e-9)
        out.append(MonthSplit(str(label), np.arange(lo, cut), np.arange(cut, hi)))
    return out


def standardize(
    features: np.ndarray, splits: Sequence[MonthSplit], mode: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-scores the features.

    Args:
      features: float [plays, F].
      splits: the monthly splits; with `mode="train"` the statistics use only their train plays
        (all months), so no test play leaks into the scaling.
      mode: "train", or "global" (all plays; the report's choice, which leaks test statistics).

    Returns:
      (z float32 [plays, F], mean float64 [F], std float64 [F]); a constant feature gets std 1.
    """
    if mode == "train":
        fit = features[np.concatenate([s.train for s in splits])]
    elif mode == "global":
        fit = features
    else:
        raise ValueError(f"standardize={mode!r}: must be 'train' or 'global'")
    if not len(fit):
        raise DataError("no training plays to fit the feature scaling on")
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    if np.any(std == 0):
        logging.warning("constant feature column(s) %s: left unscaled", np.flatnonzero(std == 0))
    std = np.where(std > 0, std, 1.0)
    return ((features - mean) / std).astype(np.float32), mean, std


def window_index(segment: np.ndarray, seq_len: int, pred_steps: int) -> np.ndarray:
    """All windows of a contiguous run of plays, as play indices.

    Args:
      segment: int [n], play indices in time order (one month's train or test).
      seq_len: inputs per window.
      pred_steps: targets per window.

    Returns:
      int64 [N, seq_len + pred_steps], row i = segment[i : i + seq_len + pred_steps], with
      N = max(n - seq_len - pred_steps + 1, 0).
    """
    width = seq_len + pred_steps
    n = max(len(segment) - width + 1, 0)
    return np.asarray(segment, np.int64)[np.arange(n)[:, None] + np.arange(width)]


def _sample(rows: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    take = math.floor(len(rows) * fraction + 1e-9)
    return rows[np.sort(rng.choice(len(rows), size=take, replace=False))]


def dynamic_train(
    splits: Sequence[MonthSplit],
    seq_len: int,
    pred_steps: int,
    seed: int,
    prev_test_fraction: float = 0.5,
    prev_train_fraction: float = 0.2,
) -> list[np.ndarray]:
    """The report's monthly training sets, as windows (play indices).

    Month 0 trains on its train windows. Month k > 0 trains on its train windows, plus a seeded
    `prev_test_fraction` sample of month k-1's test windows and a `prev_train_fraction` sample of
    month k-1's train windows (sizes rounded down). Windows, not plays, are sampled so that each
    window is a real run of consecutive plays.

    Returns:
      Per month, int64 [N_k, seq_len + pred_steps], rows ordered by their first play. Month k
      depends only on (seed, k).
    """
    out = []
    for k, split in enumerate(splits):
        parts = [window_index(split.train, seq_len, pred_steps)]
        if k:
            rng, prev = np.random.default_rng([seed, k]), splits[k - 1]
            for segment, fraction in (
                (prev.test, prev_test_fraction),
                (prev.train, prev_train_fraction),
            ):
                parts.append(_sample(window_index(segment, seq_len, pred_steps), fraction, rng))
        rows = np.concatenate(parts)
        out.append(rows[np.argsort(rows[:, 0], kind="stable")])
    return out


def to_arrays(z: np.ndarray, index: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Gathers windows of features.

    Args:
      z: float32 [plays, F], scaled features.
      index: int [N, seq_len + pred_steps], from `window_index` or `dynamic_train`.
      seq_len: inputs per window.

    Returns:
      (x float32 [N, seq_len, F], y float32 [N, pred_steps, F]).
    """
    windows = z[index]
    return windows[:, :seq_len], windows[:, seq_len:]


def check_windows(data: AudioData, splits: Sequence[MonthSplit], seq_len: int, pred_steps: int):
    """Raises `DataError` unless at least one month's test part holds one whole window."""
    need = seq_len + pred_steps
    if not any(len(s.test) >= need for s in splits):
        biggest = max((len(s.test) for s in splits), default=0)
        raise DataError(
            f"{', '.join(data.sources)}: {len(data.songs)} plays left after cleaning; no month's "
            f"test part has the {need} plays one window needs (seq_len {seq_len} + pred_steps "
            f"{pred_steps}; largest has {biggest})"
        )


def monthly_z(features: np.ndarray, splits: Sequence[MonthSplit]) -> list[np.ndarray]:
    """Per month k, the features z-scored with the mean and std of the plays before month k's
    test part (its training plays and all earlier months): no test or later play is looked at.

    Args:
      features: float [plays, F], time order; splits: the monthly splits of those plays.

    Returns:
      One float32 [plays, F] array per month (a constant feature gets std 1).
    """
    out = []
    for split in splits:
        end = int(split.test[0]) if len(split.test) else int(split.train[-1]) + 1
        mean, std = features[:end].mean(axis=0), features[:end].std(axis=0)
        out.append(((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32))
    return out
